"""The one error hierarchy. The API maps these to HTTP status codes in one place (api/errors.py); the CLI turns
them into a one-line message and exit code 1.

An error that stands for a builtin one also subclasses it, so code and libraries that catch the builtin catch it too:
an invalid request is a ValueError, a missing thing a LookupError (not KeyError, whose message is the repr of a key).
"""


class TinkerdError(Exception):
    """Base class of every error tinkerd raises on purpose."""


class InvalidRequestError(TinkerdError, ValueError):
    """The user sent something we cannot act on (maps to 400)."""


class NotFoundError(TinkerdError, LookupError):
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


class SettingsError(TinkerdError, ValueError):
    """A setting has a value that cannot be used (e.g. a port that is not a number); the CLI says which and exits."""
