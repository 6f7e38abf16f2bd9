"""Property tests of norm clipping (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradclip_algo import apply_gradient_clipping

shapes = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3), min_size=1, max_size=5)


@st.composite
def grads_and_threshold(draw: st.DrawFn) -> tuple[list[torch.nn.Parameter], float, float]:
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(1e-4, 1e4))
    threshold = draw(st.floats(1e-3, 1e3))
    norm_type = draw(st.sampled_from([1.0, 2.0, 3.5, math.inf]))
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in draw(shapes):
        param = torch.nn.Parameter(torch.zeros(shape))
        param.grad = torch.randn(shape, generator=gen, dtype=torch.float64).float() * scale
        params.append(param)
    return params, threshold, norm_type


def norm_of(params: list[torch.nn.Parameter], norm_type: float) -> float:
    flat = torch.cat([p.grad.flatten().double() for p in params])
    return torch.linalg.vector_norm(flat, norm_type).item()


@settings(max_examples=150, deadline=None)
@given(grads_and_threshold())
def test_norm_is_bounded_direction_kept_and_idempotent(case: tuple) -> None:
    params, threshold, norm_type = case
    before = [p.grad.clone() for p in params]
    norm_before = norm_of(params, norm_type)
    apply_gradient_clipping(params, "norm", threshold, norm_type=norm_type)
    assert norm_of(params, norm_type) <= threshold * (1 + 1e-5)
    if norm_before + 1e-6 <= threshold:  # under the threshold: untouched (factor is min(1, λ / (‖G‖ + 1e-6)))
        for p, g in zip(params, before, strict=True):
            assert torch.equal(p.grad, g)
    # direction kept: every grad is the same positive multiple of its original
    flat_before = torch.cat([g.flatten().double() for g in before])
    flat_after = torch.cat([p.grad.flatten().double() for p in params])
    if norm_before > 0:
        cosine = torch.dot(flat_before, flat_after) / (flat_before.norm() * flat_after.norm())
        assert cosine.item() > 1 - 1e-6
    once = [p.grad.clone() for p in params]
    apply_gradient_clipping(params, "norm", threshold, norm_type=norm_type)
    # torch's rule divides by ‖G‖ + 1e-6, so a second pass may shrink a clipped grad by up to 1e-6 / λ
    for p, g in zip(params, once, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=2e-6 + 2e-6 / threshold, atol=0)


@settings(max_examples=100, deadline=None)
@given(grads_and_threshold())
def test_value_and_adaptive_are_idempotent(case: tuple) -> None:
    params, threshold, _ = case
    for clipping_type in ("value", "adaptive"):
        apply_gradient_clipping(params, clipping_type, threshold)
        once = [p.grad.clone() for p in params]
        apply_gradient_clipping(params, clipping_type, threshold)
        for p, g in zip(params, once, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=2e-6, atol=0)
        if clipping_type == "value":
            bound = torch.tensor(threshold, dtype=torch.float32)  # clamp rounds λ to the grads' dtype
            assert all(bool((p.grad.abs() <= bound).all()) for p in params)
