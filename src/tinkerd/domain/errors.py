"""The one error hierarchy. The API maps these to HTTP status codes in one place."""


class TinkerdError(Exception):
    """Base class of every error tinkerd raises on purpose."""


class InvalidRequestError(TinkerdError):
    """The user sent something we cannot act on (maps to 400)."""


class NotFoundError(TinkerdError):
    """A named model, run, sampler or checkpoint does not exist (maps to 404)."""


class PermissionDeniedError(TinkerdError):
    """The caller may see the thing but not do this to it, e.g. delete another user's published checkpoint (403)."""


class ConflictError(TinkerdError):
    """The request contradicts the current state (maps to 409)."""


class CapacityError(TinkerdError):
    """Too much work is queued; the client should back off (maps to 429)."""


class LimitExceededError(CapacityError):
    """A per-user cap that waiting a few seconds will not lift (e.g. open training runs): 429, marked not retryable."""


class ModelFetchError(TinkerdError):
    """A model could not be fetched or converted."""
