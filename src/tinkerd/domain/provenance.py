"""Provenance spans: checking that a datum's runs are well formed, and which target positions are sampled tokens.

Facts from the Tinker docs (tinker/datum, "Provenance") and the SDK 0.38 (``Datum.with_provenance``): spans come as a
pair (both lists or neither); ``model_input_spans`` tile the input tokens and ``loss_fn_input_spans`` tile the rows of
``target_tokens`` (their lengths sum to those lengths, position comes from order); each span names a non-empty
``sequence_id`` with a non-negative offset and length.
"""

from __future__ import annotations

from collections.abc import Sequence

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import Datum, ProvenanceSpan


def _check_runs(where: str, spans: Sequence[ProvenanceSpan], covers: int, what: str) -> None:
    for i, span in enumerate(spans):
        if not span.sequence_id:
            raise InvalidRequestError(f"{where}[{i}] has an empty sequence_id")
        if span.offset < 0 or span.length < 0:
            raise InvalidRequestError(
                f"{where}[{i}] has offset {span.offset} and length {span.length}; both must be >= 0"
            )
    total = sum(span.length for span in spans)
    if total != covers:
        raise InvalidRequestError(f"{where} cover {total} positions but {what} has {covers}; the runs must tile it")


def check_provenance(datum: Datum, where: str) -> None:
    """Raise InvalidRequestError unless the datum has no provenance or a well-formed pair of span lists."""
    inputs, targets = datum.model_input_spans, datum.loss_fn_input_spans
    if inputs is None and targets is None:
        return
    if inputs is None or targets is None:
        raise InvalidRequestError(f"{where}: provenance comes as a pair; set both span lists or neither")
    _check_runs(f"{where}.model_input_spans", inputs, len(datum.tokens), "model_input")
    target_tokens = datum.loss_fn_inputs.get("target_tokens")
    if target_tokens is not None and target_tokens.shape:
        _check_runs(f"{where}.loss_fn_input_spans", targets, target_tokens.shape[0], "target_tokens")


def sampled_positions(spans: Sequence[ProvenanceSpan]) -> list[bool]:
    """Per position tiled by ``spans``: True where the token there is one a sampler produced."""
    flags: list[bool] = []
    for span in spans:
        flags.extend([span.kind == "sampled"] * span.length)
    return flags
