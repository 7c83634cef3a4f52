"""The split of a batch across ranks: balanced by tokens, deterministic, every datum exactly once."""

from __future__ import annotations

import random

import pytest

from tinkerd.engine.distributed.split import balance, datum_cost


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_every_item_once_and_balanced(parts: int) -> None:
    rng = random.Random(parts)
    checked = 0
    for _ in range(200):
        costs = [rng.randint(1, 512) for _ in range(rng.randint(0, 40))]
        shares = balance(costs, parts)
        assert len(shares) == parts
        assert sorted(i for share in shares for i in share) == list(range(len(costs)))
        assert all(share == sorted(share) for share in shares)
        loads = [sum(costs[i] for i in share) for share in shares]
        if costs:
            # greedy longest-first: no share exceeds the lightest by more than the largest item
            assert max(loads) - min(loads) <= max(costs)
            checked += 1
    assert checked > 150


def test_same_split_every_time_and_heavy_items_spread() -> None:
    costs = [100, 10, 100, 10, 50, 50]
    assert balance(costs, 2) == balance(list(costs), 2)
    assert balance(costs, 2) == [[0, 1, 4], [2, 3, 5]]
    assert balance([], 2) == [[], []]
    assert balance([5], 3) == [[0], [], []]


def test_backward_tokens_weigh_more() -> None:
    assert datum_cost(10, backward=True) > datum_cost(10, backward=False) == 10
    with pytest.raises(ValueError):
        balance([1], 0)
