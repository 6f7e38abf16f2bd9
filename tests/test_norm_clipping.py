"""'norm' against torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MixedModel, backward_mixed, grads, random_grads, twin

from gradclip_algo import apply_gradient_clipping

NORM_TYPES = [1.0, 2.0, 3.5, math.inf]
# One rounding of the dtype: what separates a product computed from an fp32 coefficient and its reference.
DTYPE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_matches_torch_after_real_backward(mixed_model: MixedModel, norm_type: float, scale: float) -> None:
    backward_mixed(mixed_model, scale=scale)
    reference = twin(mixed_model)
    stats = apply_gradient_clipping(mixed_model, "norm", 2.0, norm_type=norm_type)
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 2.0, norm_type=norm_type)
    torch.testing.assert_close(stats.grad_norm, expected_norm, rtol=1e-5, atol=0)
    for got, want in zip(grads(mixed_model), grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_fp32_torch_reference_for_each_dtype(norm_type: float, dtype: torch.dtype) -> None:
    model = MixedModel().to(dtype)
    random_grads(model, seed=3)
    reference = MixedModel()
    for ref_param, param in zip(reference.parameters(), model.parameters(), strict=True):
        ref_param.grad = param.grad.to(torch.float32, copy=True)
    threshold = 5.0
    stats = apply_gradient_clipping(model, "norm", threshold, norm_type=norm_type)
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), threshold, norm_type=norm_type)
    assert stats.grad_norm.dtype == torch.float32
    torch.testing.assert_close(stats.grad_norm, expected_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.clipped_grad_norm, torch.tensor(threshold), rtol=1e-5, atol=0)
    assert stats.clipped_fraction.item() == 1.0
    for got, want in zip(grads(model), grads(reference), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), rtol=DTYPE_RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_on_its_own_dtype(dtype: torch.dtype) -> None:
    """Against torch run on the same low-precision grads (torch reduces in that dtype, we in fp32)."""
    model = MixedModel().to(dtype)
    random_grads(model, seed=4, scale=0.01)
    reference = twin(model)
    apply_gradient_clipping(model, "norm", 0.5)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    for got, want in zip(grads(model), grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=2 * DTYPE_RTOL[dtype], atol=1e-7)  # fp16 subnormals


def test_fp16_norm_does_not_overflow() -> None:
    """Grads whose norm exceeds fp16's range still get a finite norm and clip to the threshold."""
    param = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    param.grad = torch.full((4096,), 60000.0, dtype=torch.float16)
    stats = apply_gradient_clipping([param], "norm", 1.0)
    torch.testing.assert_close(stats.grad_norm, torch.tensor(60000.0 * 64), rtol=1e-5, atol=0)
    torch.testing.assert_close(param.grad.float().norm(), torch.tensor(1.0), rtol=2e-3, atol=0)


def test_under_threshold_is_untouched_and_stats_say_so(mixed_model: MixedModel) -> None:
    backward_mixed(mixed_model, scale=1e-4)
    before = grads(mixed_model)
    stats = apply_gradient_clipping(mixed_model, "norm", 1e3)
    for got, want in zip(grads(mixed_model), before, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert stats.clipped_fraction.item() == 0.0
    torch.testing.assert_close(stats.clipped_grad_norm, stats.grad_norm, rtol=1e-6, atol=0)


def test_large_tensors_take_the_cpu_dot_path_and_match_torch() -> None:
    params = [torch.nn.Parameter(torch.zeros(300, 200)) for _ in range(3)] + [
        torch.nn.Parameter(torch.zeros(7))
    ]
    gen = torch.Generator().manual_seed(0)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for ref, param in zip(reference, params, strict=True):
        ref.grad = param.grad.clone()
    stats = apply_gradient_clipping(params, "norm", 1.0)
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.testing.assert_close(stats.grad_norm, expected, rtol=1e-5, atol=0)
    for param, ref in zip(params, reference, strict=True):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_small_tensors_of_every_kind_match_torch(norm_type: float, dtype: torch.dtype) -> None:
    """Small CPU grads are packed into blocks by shape (1-D ones of any length together) before one kernel
    per block: many packs of one shape, 1-D of mixed lengths, 0-d, empty and strided grads, and large ones."""
    gen = torch.Generator().manual_seed(4)
    shapes = [*[(7, 9)] * 300, *[(n,) for n in range(1, 60)], (), (), (0,), (0, 4), (3, 5, 4), (300, 200)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen, dtype=dtype)
    for rows, cols in ((30, 20), (300, 200)):  # strided, small and large
        params.append(torch.nn.Parameter(torch.zeros(rows, cols, dtype=dtype)))
        params[-1].grad = torch.randn(cols, rows, generator=gen, dtype=dtype).t()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for ref, param in zip(reference, params, strict=True):
        ref.grad = param.grad.clone()
    stats = apply_gradient_clipping(params, "norm", 1.0, norm_type=norm_type)
    non_empty = [ref for ref in reference if ref.numel()]  # torch's inf-norm refuses empty tensors
    expected = torch.nn.utils.clip_grad_norm_(non_empty, 1.0, norm_type=norm_type)
    torch.testing.assert_close(stats.grad_norm.double(), expected.double(), rtol=1e-5, atol=0)
    for param, ref in zip(params, reference, strict=True):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-8)
