"""'adaptive' (AGC) against hand-computed cases and a float64 reference of the paper's rule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MixedModel, backward_mixed, grads
from references import agc_reference
from torch import nn

from gradclip_algo import apply_gradient_clipping, kernels


def as_units(tensor: torch.Tensor) -> torch.Tensor:
    """One row per AGC unit."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.ndim >= 2 else tensor.reshape(1, -1)


def param_with_grad(weight: torch.Tensor, grad: torch.Tensor) -> nn.Parameter:
    param = nn.Parameter(weight.clone())
    param.grad = grad.clone()
    return param


def test_hand_computed_1d() -> None:
    # ‖W‖ = 5, λ = 0.1 -> M = 0.5; ‖G‖ = 10 -> G · 0.05
    param = param_with_grad(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0]))
    stats = apply_gradient_clipping(param, "adaptive", 0.1)
    torch.testing.assert_close(param.grad, torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(stats.grad_norm, torch.tensor(10.0))
    torch.testing.assert_close(stats.clipped_grad_norm, torch.tensor(0.5))
    assert stats.clipped_fraction.item() == 1.0


def test_hand_computed_2d_rows_are_units() -> None:
    # row 0: ‖W‖=1, M=0.5, ‖G‖=2 -> scaled by 1/4; row 1: ‖W‖=10, M=5, ‖G‖=1 -> kept
    weight = torch.tensor([[1.0, 0.0], [6.0, 8.0]])
    grad = torch.tensor([[0.0, 2.0], [0.6, 0.8]])
    param = param_with_grad(weight, grad)
    stats = apply_gradient_clipping(param, "adaptive", 0.5)
    torch.testing.assert_close(param.grad, torch.tensor([[0.0, 0.5], [0.6, 0.8]]))
    assert stats.clipped_fraction.item() == 0.5
    torch.testing.assert_close(stats.clipped_grad_norm, torch.tensor(math.sqrt(0.25 + 1.0)))


def test_hand_computed_3d_unit_is_everything_but_dim0() -> None:
    weight = torch.ones(2, 2, 2)  # ‖W_u‖ = 2 for both units
    grad = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 0.01)])  # ‖G_0‖ = 6, ‖G_1‖ = 0.02
    param = param_with_grad(weight, grad)
    apply_gradient_clipping(param, "adaptive", 0.1)
    max_norm = 0.1 * 2.0
    torch.testing.assert_close(param.grad[0], torch.full((2, 2), 3.0 * max_norm / 6.0))
    torch.testing.assert_close(param.grad[1], torch.full((2, 2), 0.01))


def test_hand_computed_4d_conv_filters() -> None:
    weight = torch.zeros(3, 2, 2, 2)
    weight[0] = 0.5  # ‖W_0‖ = 0.5·√8
    weight[1] = 2.0  # ‖W_1‖ = 2·√8
    grad = torch.ones(3, 2, 2, 2)  # ‖G_u‖ = √8 for every filter
    param = param_with_grad(weight, grad)
    stats = apply_gradient_clipping(param, "adaptive", 0.2)
    torch.testing.assert_close(param.grad[0], torch.full((2, 2, 2), 0.2 * 0.5))  # M/‖G‖ = 0.1
    torch.testing.assert_close(param.grad[1], torch.ones(2, 2, 2) * 0.4)  # M/‖G‖ = 0.4
    # filter 2 has zero weight: M = λ·ε = 2e-4, so the grad is scaled to that norm, not zeroed
    torch.testing.assert_close(param.grad[2].norm(), torch.tensor(0.2 * 1e-3))
    assert stats.clipped_fraction.item() == 1.0


def test_zero_initialised_parameter_still_trains() -> None:
    """The ε floor: Composer's AGC multiplies such a grad by 0 for ever; ours keeps it moving."""
    bias = nn.Parameter(torch.zeros(4))
    bias.grad = torch.tensor([1.0, -1.0, 2.0, 0.5])
    apply_gradient_clipping(bias, "adaptive", 0.01)
    assert bias.grad.abs().min().item() > 0
    torch.testing.assert_close(bias.grad.norm(), torch.tensor(0.01 * 1e-3))
    optimizer = torch.optim.SGD([bias], lr=1.0)
    optimizer.step()
    assert bias.detach().abs().min().item() > 0


@pytest.mark.parametrize("clipping", [0.01, 0.08, 0.16])
@pytest.mark.parametrize("eps", [1e-3, 1e-1])
def test_random_model_matches_float64_reference(mixed_model: MixedModel, clipping: float, eps: float) -> None:
    backward_mixed(mixed_model, seed=7, scale=3.0)
    with torch.no_grad():
        mixed_model.norm.bias.zero_()
    expected = [agc_reference(p.detach(), p.grad, clipping, eps) for p in mixed_model.parameters()]
    stats = apply_gradient_clipping(mixed_model, "adaptive", clipping, eps=eps)
    for got, want in zip(grads(mixed_model), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    post = torch.cat([g.flatten() for g in expected]).norm()
    torch.testing.assert_close(stats.clipped_grad_norm.double(), post, rtol=1e-5, atol=0)


def test_exclude_by_glob_and_predicate(mixed_model: MixedModel) -> None:
    backward_mixed(mixed_model, scale=10.0)
    before = dict(mixed_model.named_parameters())
    before = {name: p.grad.clone() for name, p in before.items()}
    apply_gradient_clipping(mixed_model, "adaptive", 0.01, exclude=["head.*", lambda n, p: n == "conv.bias"])
    for name, param in mixed_model.named_parameters():
        kept = name.startswith("head.") or name == "conv.bias"
        assert torch.equal(param.grad, before[name]) == kept, name


def test_exclude_works_with_named_parameters(mixed_model: MixedModel) -> None:
    backward_mixed(mixed_model, scale=10.0)
    head_before = mixed_model.head.weight.grad.clone()
    apply_gradient_clipping(mixed_model.named_parameters(), "adaptive", 0.01, exclude="head.weight")
    assert torch.equal(mixed_model.head.weight.grad, head_before)


def test_exclude_without_names_is_a_clear_error(mixed_model: MixedModel) -> None:
    backward_mixed(mixed_model)
    with pytest.raises(ValueError, match=r"exclude: .*needs names.*nn\.Module"):
        apply_gradient_clipping(mixed_model.parameters(), "adaptive", 0.01, exclude="head.*")


def test_composer_agc_freezes_zero_weights_and_ours_does_not() -> None:
    composer_gc = pytest.importorskip("composer.algorithms.gradient_clipping.gradient_clipping")
    ours, theirs = nn.Linear(3, 2), nn.Linear(3, 2)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        with torch.no_grad():
            model.bias.zero_()
        model.bias.grad = torch.tensor([0.5, -0.5])
        model.weight.grad = torch.zeros(2, 3)
    apply_gradient_clipping(ours, "adaptive", 0.01)
    composer_gc.apply_gradient_clipping(theirs, "adaptive", 0.01, fsdp_enabled=False)
    assert torch.equal(theirs.bias.grad, torch.zeros(2))
    assert ours.bias.grad.abs().min().item() > 0


@pytest.mark.parametrize(
    ("stack_numel", "reuse_numel"),
    [(kernels.STACK_NUMEL, kernels.CPU_REUSE_NUMEL), (5000, 1000), (5000, 399)],
)
def test_large_tensor_and_stacked_small_tensor_paths_match_reference(
    monkeypatch: pytest.MonkeyPatch, stack_numel: int, reuse_numel: int
) -> None:
    """Large tensors are clipped in place (in blocks of whole rows beyond ``CPU_REUSE_NUMEL`` elements,
    a block smaller than one row included), many small same-shaped ones on chunked stacks; the per-unit
    statistics are summed per block and per stack."""
    monkeypatch.setattr(kernels, "STACK_NUMEL", stack_numel)
    monkeypatch.setattr(kernels, "CPU_REUSE_NUMEL", reuse_numel)
    gen = torch.Generator().manual_seed(11)
    shapes = [(300, 400), (600, 32, 32), *[(32, 32)] * 603, *[(5,)] * 40, *[()] * 7, (50000,)]
    params = [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * torch.rand((), generator=gen) * 0.01
    with torch.no_grad():
        params[-2].zero_()
    expected = [agc_reference(p.detach(), p.grad, 0.05) for p in params]
    before = torch.cat([p.grad.flatten() for p in params]).double().norm()
    rows = [(as_units(p.grad.double()), as_units(want)) for p, want in zip(params, expected, strict=True)]
    clipped = sum(int((was != want).any(dim=1).sum()) for was, want in rows)
    total_units = sum(was.shape[0] for was, _ in rows)
    stats = apply_gradient_clipping(params, "adaptive", 0.05)
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-9)
    post = torch.cat([g.flatten() for g in expected]).norm()
    torch.testing.assert_close(stats.grad_norm.double(), before, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.clipped_grad_norm.double(), post, rtol=1e-5, atol=0)
    assert 0 < clipped < total_units
    assert stats.clipped_fraction.item() == pytest.approx(clipped / total_units, rel=1e-6)
