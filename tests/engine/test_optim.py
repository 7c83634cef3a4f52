"""Our foreach AdamW against torch.optim.AdamW + clip_grad_norm_, its checkpointable state, and its edge cases."""

from __future__ import annotations

import pytest
import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import AdamParams
from tinkerd.engine.optim import AdamState, adamw_step

SHAPES = [(4, 8), (8,), (3, 5, 2), (1, 16)]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).requires_grad_(True) for shape in SHAPES]


def make_grads(step: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [scale * torch.randn(shape, generator=g) for shape in SHAPES]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in params]


def torch_reference_step(
    params: list[torch.Tensor], opt: torch.optim.Optimizer, grads: list[torch.Tensor | None], adam: AdamParams
) -> float:
    for p, grad in zip(params, grads, strict=True):
        p.grad = None if grad is None else grad.clone()
    with_grad = [p for p in params if p.grad is not None]
    max_norm = adam.grad_clip_norm if adam.grad_clip_norm > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def torch_adamw(params: list[torch.Tensor], adam: AdamParams) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
    )


def ours_step(params: list[torch.Tensor], state: AdamState, grads: list[torch.Tensor | None], adam: AdamParams):
    for p, grad in zip(params, grads, strict=True):
        p.grad = None if grad is None else grad.clone()
    return adamw_step(params, state, adam)


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    # Bit-identical with torch 2.13 (same ops in the same order); a hair of slack survives torch changing kernels.
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


ADAMS = [
    pytest.param(AdamParams(learning_rate=1e-2), id="tinker-defaults"),
    pytest.param(AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.1), id="decay"),
    pytest.param(AdamParams(learning_rate=1e-2, weight_decay=0.05, grad_clip_norm=1.0), id="decay+clipping"),
    pytest.param(AdamParams(learning_rate=1e-2, eps=1e-8, grad_clip_norm=1e6), id="clip-inactive"),
]


@pytest.mark.parametrize("adam", ADAMS)
def test_matches_torch_adamw_with_clip_grad_norm(adam: AdamParams) -> None:
    ours, theirs = make_params(), make_params()
    opt, state = torch_adamw(theirs, adam), AdamState()
    for step in range(6):
        grads: list[torch.Tensor | None] = list(make_grads(step, scale=3.0))
        their_norm = torch_reference_step(theirs, opt, grads, adam)
        metrics = ours_step(ours, state, grads, adam)
        assert metrics["grad_norm"] == pytest.approx(their_norm, rel=1e-6)
        assert metrics["update_skipped"] == 0.0
        assert_same(ours, theirs)
    assert state.step == 6
    assert all(p.grad is None for p in ours)


def test_clipping_is_by_global_norm_and_reports_the_norm_before_clipping() -> None:
    adam = AdamParams(learning_rate=1e-2, grad_clip_norm=0.5)
    params, state = make_params(), AdamState()
    grads = make_grads(0, scale=10.0)
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    metrics = ours_step(params, state, list(grads), adam)
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-6)
    assert expected_norm > 0.5  # clipping really happened
    # Adam's first step moves each weight by about lr whatever the gradient's size; the clip shows in the moments.
    clipped_total = torch.linalg.vector_norm(torch.cat([m.flatten() for m in state.exp_avg])) / (1 - 0.9)
    assert clipped_total.item() == pytest.approx(0.5, rel=1e-4)


def test_state_round_trip_continues_exactly_like_an_uninterrupted_run() -> None:
    adam = AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=2.0)
    straight, straight_state = make_params(), AdamState()
    resumed, first_state = make_params(), AdamState()
    for step in range(3):
        ours_step(straight, straight_state, list(make_grads(step)), adam)
        ours_step(resumed, first_state, list(make_grads(step)), adam)
    saved = first_state.state_dict()
    assert set(saved) == {"step"} | {f"{n}.{i}" for i in range(len(SHAPES)) for n in ("exp_avg", "exp_avg_sq")}
    assert saved["step"].dtype == torch.int64 and saved["step"].tolist() == [3] * len(SHAPES)
    ours_step(resumed, first_state, list(make_grads(99)), adam)  # the export is a copy: later steps leave it alone
    resumed = [p.detach().clone().requires_grad_(True) for p in straight]  # the weights checkpointed beside it
    loaded = AdamState()
    loaded.load_state_dict(saved)
    for step in range(3, 6):
        ours_step(straight, straight_state, list(make_grads(step)), adam)
        ours_step(resumed, loaded, list(make_grads(step)), adam)
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)
    assert loaded.step == 6


def test_params_without_grad_are_skipped_like_torch_does() -> None:
    adam = AdamParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=1.0)
    ours, theirs = make_params(), make_params()
    opt, state = torch_adamw(theirs, adam), AdamState()
    for step in range(5):
        grads: list[torch.Tensor | None] = list(make_grads(step))
        grads[1] = None if step < 2 else grads[1]  # param 1 gets its first gradient at step 2
        grads[3] = None if step % 2 else grads[3]  # param 3 only on even steps
        torch_reference_step(theirs, opt, grads, adam)
        ours_step(ours, state, grads, adam)
        assert_same(ours, theirs)
    assert state.steps == [5, 3, 5, 3]
    before = [p.detach().clone() for p in ours]
    assert adamw_step(ours, state, adam)["grad_norm"] == 0.0  # no gradients at all: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(ours, before, strict=True))


def test_non_finite_gradient_skips_the_update_instead_of_poisoning_the_adapter() -> None:
    adam = AdamParams(learning_rate=1e-2, weight_decay=0.1)
    params, state = make_params(), AdamState()
    ours_step(params, state, list(make_grads(0)), adam)
    before = [p.detach().clone() for p in params]
    saved = state.state_dict()
    bad: list[torch.Tensor | None] = list(make_grads(1))
    assert bad[2] is not None
    bad[2][0, 0, 0] = float("nan")
    metrics = ours_step(params, state, bad, adam)
    assert metrics["update_skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert all(torch.equal(state.state_dict()[k], v) for k, v in saved.items())
    assert all(p.grad is None for p in params)


def test_invalid_hyperparameters_are_a_user_error() -> None:
    params = make_params()
    for bad in [
        AdamParams(learning_rate=-1.0),
        AdamParams(beta1=1.0),
        AdamParams(beta2=-0.1),
        AdamParams(eps=-1e-8),
        AdamParams(weight_decay=-0.1),
        AdamParams(grad_clip_norm=-1.0),
        AdamParams(learning_rate=float("nan")),
    ]:
        with pytest.raises(InvalidRequestError):
            adamw_step(params, AdamState(), bad)


def test_state_from_another_adapter_is_rejected() -> None:
    adam = AdamParams()
    params, state = make_params(), AdamState()
    ours_step(params, state, list(make_grads(0)), adam)
    saved = state.state_dict()
    other = AdamState()
    other.load_state_dict(saved)
    with pytest.raises(InvalidRequestError, match="shape"):
        adamw_step([torch.zeros(2, 2, requires_grad=True), *params[1:]], other, adam)
    with pytest.raises(InvalidRequestError, match="parameters"):
        adamw_step(params[:2], other, adam)
    broken = dict(saved)
    del broken["exp_avg_sq.1"]
    with pytest.raises(InvalidRequestError, match=r"exp_avg_sq\.1"):
        AdamState().load_state_dict(broken)
