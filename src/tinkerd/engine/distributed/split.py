"""Splitting a batch's datums across ranks so that each rank gets about the same work (pure, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

# A backward pass costs about twice its forward: a forward_backward token weighs three forward-only tokens.
BACKWARD_WEIGHT = 3


def balance(costs: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``costs`` for each of ``parts`` shares, the heaviest item first onto the lightest share (ties: the
    lower share), each share in ascending index order. Deterministic: every rank computes the same split."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    loads = [0] * parts
    shares: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        lightest = min(range(parts), key=lambda p: (loads[p], p))
        shares[lightest].append(i)
        loads[lightest] += costs[i]
    return [sorted(share) for share in shares]


def datum_cost(num_tokens: int, backward: bool) -> int:
    return num_tokens * (BACKWARD_WEIGHT if backward else 1)
