"""'value' against torch.nn.utils.clip_grad_value_."""

from __future__ import annotations

import pytest
import torch
from conftest import MixedModel, backward_mixed, grads, random_grads, twin

from gradclip_algo import apply_gradient_clipping


@pytest.mark.parametrize("threshold", [1e-3, 0.05, 1.0, 1e3])
def test_matches_torch_exactly(mixed_model: MixedModel, threshold: float) -> None:
    backward_mixed(mixed_model)
    reference = twin(mixed_model)
    before = grads(mixed_model)
    stats = apply_gradient_clipping(mixed_model, "value", threshold)
    torch.nn.utils.clip_grad_value_(reference.parameters(), threshold)
    for got, want in zip(grads(mixed_model), grads(reference), strict=True):
        assert torch.equal(got, want)
    flat_before = torch.cat([g.flatten() for g in before])
    flat_after = torch.cat([g.flatten() for g in grads(mixed_model)])
    torch.testing.assert_close(stats.grad_norm, flat_before.norm(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.clipped_grad_norm, flat_after.norm(), rtol=1e-5, atol=0)
    expected_fraction = (flat_before.abs() > threshold).float().mean()
    torch.testing.assert_close(stats.clipped_fraction, expected_fraction, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_torch(dtype: torch.dtype) -> None:
    model = MixedModel().to(dtype)
    random_grads(model, seed=1)
    reference = twin(model)
    apply_gradient_clipping(model, "value", 0.3)
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.3)
    for got, want in zip(grads(model), grads(reference), strict=True):
        assert torch.equal(got, want)


def test_values_at_the_bound_are_kept_and_not_counted() -> None:
    param = torch.nn.Parameter(torch.zeros(5))
    param.grad = torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.0])
    stats = apply_gradient_clipping(param, "value", 1.0)
    assert torch.equal(param.grad, torch.tensor([-1.0, -1.0, 0.5, 1.0, 1.0]))
    assert stats.clipped_fraction.item() == pytest.approx(2 / 5)


def test_blocked_paths_match_torch_on_large_and_many_small_tensors() -> None:
    """Tensors larger than a block are split, small ones measured on packed copies and clamped in place
    (0-d, empty and strided ones too): both must match torch."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(700, 1000), (300,), (70000,), *[(7, 9)] * 300, (3, 5, 4), (), (0,), (0, 3)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    for rows, cols in ((40, 30), (300, 200)):  # non-contiguous grads, smaller and larger than a block
        params.append(torch.nn.Parameter(torch.zeros(rows, cols)))
        params[-1].grad = torch.randn(cols, rows, generator=gen).t()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for ref, p in zip(reference, params, strict=True):
        ref.grad = p.grad.clone()
    flat_before = torch.cat([p.grad.flatten() for p in params]).double()
    stats = apply_gradient_clipping(params, "value", 1.5)
    torch.nn.utils.clip_grad_value_(reference, 1.5)
    for p, ref in zip(params, reference, strict=True):
        assert torch.equal(p.grad, ref.grad)
    flat_after = torch.cat([p.grad.flatten() for p in params]).double()
    torch.testing.assert_close(stats.grad_norm.double(), flat_before.norm(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.clipped_grad_norm.double(), flat_after.norm(), rtol=1e-5, atol=0)
    assert stats.clipped_fraction.item() == pytest.approx(
        (flat_before.abs() > 1.5).double().mean().item(), rel=1e-6
    )


@pytest.mark.parametrize("clipping_type", ["norm", "value", "adaptive"])
def test_without_stats_clips_the_same_and_returns_none(mixed_model: MixedModel, clipping_type: str) -> None:
    random_grads(mixed_model, seed=2)
    reference = twin(mixed_model)
    assert apply_gradient_clipping(mixed_model, clipping_type, 0.3, with_stats=False) is None
    apply_gradient_clipping(reference, clipping_type, 0.3)
    for got, want in zip(grads(mixed_model), grads(reference), strict=True):
        assert torch.equal(got, want)
