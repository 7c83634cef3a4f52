"""`tinker://` checkpoint paths: `tinker://<run_id>/<kind>/<name>`, kind one of `weights` (save_state: adapter and
optimizer), `sampler_weights` (the adapter, for sampling) and `external_weights` (save_weights_external: a PEFT
adapter exported for download).

A path names a directory in blob storage (`<root>/<run_id>/<kind>/<name>`), so parsing is also the security
boundary: every accepted path is exactly three safe segments and cannot climb out of the storage root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ids import validate_run_id

CheckpointKind = Literal["weights", "sampler_weights", "external_weights"]
CHECKPOINT_KINDS: tuple[CheckpointKind, ...] = ("weights", "sampler_weights", "external_weights")

SCHEME = "tinker://"
MAX_NAME_LENGTH = 128

# Names come from users (`save_state("step_100")`). Letters, digits and a few punctuation marks that are safe in
# file names and URL path segments; no leading '.' (hidden files, '.', '..') and no leading '-' (option injection
# into shell tools). Spaces and non-ASCII are refused rather than escaped: the SDK inserts names into REST URLs
# verbatim.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@,~-]*")


def validate_checkpoint_name(value: object) -> str:
    """The value as a checkpoint name, or InvalidRequestError naming it."""
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"checkpoint name must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidRequestError(f"checkpoint name is longer than {MAX_NAME_LENGTH} characters: {value[:40]!r}...")
    if _NAME.fullmatch(value) is None:
        raise InvalidRequestError(
            f"checkpoint name {value!r} is not valid: use letters, digits and . _ - + = @ , ~ "
            "and start with a letter, digit or '_'"
        )
    return value


def validate_checkpoint_kind(value: object) -> CheckpointKind:
    if value not in CHECKPOINT_KINDS:
        raise InvalidRequestError(f"checkpoint kind must be one of {', '.join(CHECKPOINT_KINDS)}; got {value!r}")
    return cast(CheckpointKind, value)


@dataclass(frozen=True, order=True)
class TinkerPath:
    """A parsed checkpoint path. Constructing one validates it, so holding a TinkerPath means it is safe."""

    run_id: str
    kind: CheckpointKind
    name: str

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        validate_checkpoint_kind(self.kind)
        validate_checkpoint_name(self.name)

    def __str__(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        """The two-segment id the REST endpoints use, e.g. `weights/<name>`."""
        return f"{self.kind}/{self.name}"

    def parts(self) -> tuple[str, str, str]:
        """Directory components under a storage root, in order; each is a single safe segment."""
        return (self.run_id, self.kind, self.name)


def format_tinker_path(run_id: str, kind: CheckpointKind, name: str) -> str:
    return str(TinkerPath(run_id, kind, name))


def parse_tinker_path(value: object) -> TinkerPath:
    """`tinker://<run_id>/<kind>/<name>` as a TinkerPath, or InvalidRequestError naming the bad value."""
    if not isinstance(value, str) or not value.startswith(SCHEME):
        raise InvalidRequestError(f"expected a path starting with {SCHEME}, got {value!r}")
    segments = value[len(SCHEME) :].split("/")
    if len(segments) != 3:
        raise InvalidRequestError(
            f"{value!r} is not a checkpoint path: expected {SCHEME}<run_id>/<{'|'.join(CHECKPOINT_KINDS)}>/<name>"
        )
    run_id, kind, name = segments
    return TinkerPath(run_id, validate_checkpoint_kind(kind), name)


def parse_checkpoint_id(value: object) -> tuple[CheckpointKind, str]:
    """The REST form `weights/<name>` as (kind, name), or InvalidRequestError."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise InvalidRequestError(f"checkpoint id must look like 'weights/<name>', got {value!r}")
    kind, name = value.split("/")
    return validate_checkpoint_kind(kind), validate_checkpoint_name(name)
