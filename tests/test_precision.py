"""fp16 and bf16 grads and bf16 parameters: norms accumulate in fp32; results match an fp32 reference.

The reference clips fp32 copies of the same low-precision values, so the only allowed difference is the
final rounding of the clipped grads to their own dtype. The two-rank bf16 case is in test_distributed.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MixedModel, random_grads, twin
from torch import nn

from gradclip_algo import apply_gradient_clipping

LOW_PRECISION = [torch.float16, torch.bfloat16]
SETTINGS = [
    ("norm", 1.0, {}),
    ("norm", 5.0, {"norm_type": 1.0}),
    ("norm", 0.5, {"norm_type": math.inf}),
    ("value", 0.05, {}),
    ("adaptive", 0.05, {}),
]


def fp32_copy(model: nn.Module) -> nn.Module:
    """The same weights and grads, upcast to fp32 (exactly: fp16 and bf16 values are fp32 values)."""
    copied = twin(model).float()
    for source, target in zip(model.parameters(), copied.parameters(), strict=True):
        target.grad = source.grad.float()
    return copied


def assert_matches_fp32_reference(
    model: nn.Module, clipping_type: str, threshold: float, options: dict
) -> None:
    reference = fp32_copy(model)
    stats = apply_gradient_clipping(model, clipping_type, threshold, **options)
    want = apply_gradient_clipping(reference, clipping_type, threshold, **options)
    assert want.clipped_fraction.item() > 0, "the reference must clip for the test to bite"
    for field in ("grad_norm", "clipped_grad_norm", "clipped_fraction"):
        got = getattr(stats, field)
        assert got.dtype == torch.float32
        # clipped_grad_norm is computed after rounding for 'value' (it clamps in the grads' dtype)
        torch.testing.assert_close(
            got, getattr(want, field), rtol=1e-6 if field == "grad_norm" else 4e-3, atol=0
        )
    for param, ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert param.grad.dtype == param.dtype
        eps = torch.finfo(param.dtype).eps  # one rounding to the grads' dtype
        torch.testing.assert_close(param.grad.float(), ref.grad, rtol=eps, atol=torch.finfo(param.dtype).tiny)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("clipping_type", "threshold", "options"), SETTINGS)
def test_low_precision_grads_match_fp32(
    mixed_model: MixedModel, dtype: torch.dtype, clipping_type: str, threshold: float, options: dict
) -> None:
    """fp16/bf16 weights and grads, grads spanning four orders of magnitude across tensors."""
    mixed_model.to(dtype)
    random_grads(mixed_model, seed=1, scale=0.1)
    assert_matches_fp32_reference(mixed_model, clipping_type, threshold, options)


@pytest.mark.parametrize(("clipping_type", "threshold", "options"), SETTINGS)
def test_bf16_parameters_from_a_real_backward_match_fp32(
    mixed_model: MixedModel, clipping_type: str, threshold: float, options: dict
) -> None:
    """bf16 weights and grads; AGC's weight norms come from bf16 weights, accumulated in fp32."""
    mixed_model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tokens, image = torch.randint(0, 11, (4, 5), generator=gen), torch.randn(4, 2, 6, 6, generator=gen)
    mixed_model(tokens, image.to(torch.bfloat16)).float().square().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in mixed_model.parameters())
    assert_matches_fp32_reference(mixed_model, clipping_type, threshold, options)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_norm_that_overflows_or_rounds_away_in_its_own_dtype(dtype: torch.dtype) -> None:
    """Squares of fp16 values above 256 overflow fp16 (max 65504), and a bf16 running sum keeps 8 bits; in
    fp32 neither happens, so the norm equals the float64 one to fp32 precision."""
    gen = torch.Generator().manual_seed(0)
    grads = [
        (torch.rand(4096, generator=gen) * 300).to(dtype),
        (torch.rand(50_000, generator=gen) * 1e-2).to(dtype),
    ]
    params = [nn.Parameter(torch.zeros(g.shape, dtype=dtype)) for g in grads]
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    exact = torch.linalg.vector_norm(torch.cat([g.double() for g in grads]))
    stats = apply_gradient_clipping(params, "norm", 1.0)
    assert stats.grad_norm.dtype == torch.float32
    torch.testing.assert_close(stats.grad_norm.double(), exact, rtol=1e-6, atol=0)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params]))
    torch.testing.assert_close(
        clipped, torch.tensor(1.0, dtype=torch.float64), rtol=torch.finfo(dtype).eps, atol=0
    )
