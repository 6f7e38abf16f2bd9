"""'value' against torch.nn.utils.clip_grad_value_."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MixedModel, backward_mixed, grads, random_grads, twin

from gradclip_algo import apply_gradient_clipping, compiled, kernels


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


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager kernels here; tests/test_compiled_kernels.py runs the size tests compiled."""
    monkeypatch.setattr(compiled, "_devices", ())


# ---- clamp_with_stats_: its row and pack sizes, against torch's clamp and a float64 loop ---------------

ROW = kernels.ROW_NUMEL
SIZE_CASES = {
    "one short of two rows": [2 * ROW - 1],
    "two rows": [2 * ROW],
    "two rows and a bit": [2 * ROW + 3],
    "rows and a tail, and small": [37 * ROW + 5, 2 * ROW - 1, 5],
    # 2^21 elements: packs of 16 Ki elements (1/128 of them), filled exactly by 16 of these tensors
    "packs filled exactly": [1024] * ((1 << 21) // 1024),
    # packs of 16399 elements: one element short of 16 of these tensors
    "packs one over": [1025] * 2047 + [1000],
    # the strided first tensor is 8 rows of 12,500 elements: wider than a pack (8 Ki), cut into pieces
    "strided wider than a pack": [100000, 7],
    "mixed": [2 * ROW + 7, 2 * ROW - 1, 300, 1, 0, *[97] * 700],
}


def _loop_stats(grads: list[torch.Tensor], limit: float) -> tuple[float, float, float]:
    """Σg², Σclamp(g)², #{|g| > λ} element by element in float64 (λ is exact in every dtype here)."""
    flat = torch.cat([g.reshape(-1).double() for g in grads])
    return (
        float(flat.square().sum()),
        float(flat.clamp(-limit, limit).square().sum()),
        float((flat.abs() > limit).sum()),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_row_and_pack_sizes_match_torch_and_a_float64_loop(case: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(len(case))
    limit = 1.5
    numels = SIZE_CASES[case]
    grads = [torch.randn(n, generator=gen, dtype=dtype) for n in numels]
    for g in grads:
        if g.numel() > 2:  # elements on the bound are kept and not counted; NaN is neither
            g[0], g[1], g[g.numel() // 2] = limit, -limit, math.nan
    grads[0] = grads[0] if grads[0].numel() < 64 else grads[0][: grads[0].numel() // 8 * 8].view(-1, 8).t()
    want = [g.clone() for g in grads]
    torch._foreach_clamp_min_(want, -limit)
    torch._foreach_clamp_max_(want, limit)
    finite = [g.nan_to_num(0.0) for g in grads]
    before, after, count = _loop_stats(finite, limit)
    got_before, got_count, got_after = kernels.clamp_with_stats_(grads, limit)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert got_before.dtype == got_after.dtype == kernels.accumulation_dtype(dtype)
    has_nan = any(g.numel() > 2 for g in grads)
    assert math.isnan(float(got_before)) == has_nan == math.isnan(float(got_after))
    assert int(got_count) == count
    # the same without the NaN: sums within the rounding of a float32 (float64) sum of up to 2^21 squares,
    # strided ones (grads[0]) accumulated row by row as torch's own norm does
    finite_before, finite_count, finite_after = kernels.clamp_with_stats_(finite, limit)
    rel = 1e-3 if dtype == torch.float32 else 1e-12
    assert float(finite_before) == pytest.approx(before, rel=rel)
    assert float(finite_after) == pytest.approx(after, rel=rel)
    assert int(finite_count) == count


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_and_packs_match_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen).to(dtype) for n in (3 * ROW + 5, 2 * ROW - 1, *[33] * 2000)]
    grads.append(torch.randn(300, 200, generator=gen).to(dtype).t())
    want = [g.clone() for g in grads]
    torch._foreach_clamp_min_(want, -0.75)
    torch._foreach_clamp_max_(want, 0.75)
    before, after, count = _loop_stats(grads, 0.75)
    got_before, got_count, got_after = kernels.clamp_with_stats_(grads, 0.75)
    for got, expected in zip(grads, want, strict=True):
        assert torch.equal(got, expected)
    assert got_before.dtype == torch.float32  # summed in float32, as torch's norms of half grads
    assert float(got_before) == pytest.approx(before, rel=1e-3)
    assert float(got_after) == pytest.approx(after, rel=1e-3)
    assert int(got_count) == count


# ---- with_stats='clipped': the clamp, and whether it clipped anything --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_clipped_flag_is_whether_the_count_is_positive(case: str, dtype: torch.dtype) -> None:
    """On the row and pack sizes: the grads equal torch's clamp bit for bit, the flag is 1.0 exactly
    when the full statistics count an element beyond λ (one element at λ, then one just above it), and the
    norms are NaN (not measured)."""
    limit = 0.3  # not exact in any of these dtypes: the flag compares as the clamp and the count do
    at_limit = torch.tensor(limit, dtype=dtype)
    above = torch.nextafter(at_limit, torch.tensor(math.inf, dtype=dtype))
    numels = [n for n in SIZE_CASES[case] if n]
    for extreme in (None, at_limit, above):
        gen = torch.Generator().manual_seed(len(case))
        grads = [(torch.rand(n, generator=gen) * 0.6 - 0.3).to(dtype).clamp(-limit, limit) for n in numels]
        grads = [g.where(g.abs() < at_limit, 0.0) for g in grads]  # every element strictly within λ
        if extreme is not None:
            grads[-1][grads[-1].numel() // 2] = -extreme
        full = [g.clone() for g in grads]
        want = [g.clone() for g in grads]
        torch._foreach_clamp_min_(want, -limit)
        torch._foreach_clamp_max_(want, limit)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        twins = [torch.nn.Parameter(torch.zeros_like(g)) for g in full]
        for param, grad in [*zip(params, grads, strict=True), *zip(twins, full, strict=True)]:
            param.grad = grad
        flagged = apply_gradient_clipping(params, "value", limit, with_stats="clipped")
        counted = apply_gradient_clipping(twins, "value", limit)
        for param, expected in zip(params, want, strict=True):
            assert torch.equal(param.grad, expected)
        assert float(flagged.clipped_fraction) == float(counted.clipped_fraction > 0)
        assert float(flagged.clipped_fraction) == float(extreme is above)
        assert math.isnan(float(flagged.grad_norm)) and math.isnan(float(flagged.clipped_grad_norm))


@pytest.mark.parametrize("clipping_type", ["norm", "adaptive"])
def test_clipped_mode_returns_all_statistics_where_they_cost_nothing(
    mixed_model: MixedModel, clipping_type: str
) -> None:
    random_grads(mixed_model, seed=4)
    reference = twin(mixed_model)
    stats = apply_gradient_clipping(mixed_model, clipping_type, 0.3, with_stats="clipped")
    want = apply_gradient_clipping(reference, clipping_type, 0.3)
    for got, expected in zip(grads(mixed_model), grads(reference), strict=True):
        assert torch.equal(got, expected)
    for name in ("grad_norm", "clipped_grad_norm", "clipped_fraction"):
        assert torch.equal(getattr(stats, name), getattr(want, name))
