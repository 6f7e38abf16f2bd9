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
