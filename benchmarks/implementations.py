"""The clipping implementations compared, each called as ``clip(model, threshold)``, and the floor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from composer.algorithms.gradient_clipping.gradient_clipping import (
    apply_gradient_clipping as composer_apply_gradient_clipping,
)
from timm.utils.agc import adaptive_clip_grad as timm_adaptive_clip_grad
from torch import Tensor, nn

from gradclip_algo import apply_gradient_clipping, compiled

OURS = "gradclip_algo"
OURS_EAGER = "gradclip_algo, eager kernels"
"""Ours with the compiled kernels turned off (``GRADCLIP_ALGO_COMPILE=0``)."""
OURS_WITHOUT_STATS = "gradclip_algo, with_stats=False"
OURS_CLIPPED_FLAG = "gradclip_algo, with_stats='clipped'"
OURS_VALUE_VARIANTS = {
    OURS_WITHOUT_STATS: "without statistics",
    OURS_CLIPPED_FLAG: "measuring only whether it clipped",
}
"""The cheaper calls of 'value', and what they measure."""
COMPOSER = "composer"
FLOOR = "floor"
"""Label of the floor rows; each candidate names its passes after it."""


@dataclass(frozen=True)
class Implementation:
    """One way to clip the grads of ``model`` in place."""

    label: str
    clip: Callable[[nn.Module, float], object]


def _ours(clipping_type: str) -> Implementation:
    return Implementation(
        OURS, lambda model, threshold: apply_gradient_clipping(model, clipping_type, threshold)
    )


def _ours_eager(clipping_type: str) -> Implementation:
    def clip(model: nn.Module, threshold: float) -> None:
        devices = compiled.compiled_kernel_devices()
        compiled.set_compiled_kernels(False)
        try:
            apply_gradient_clipping(model, clipping_type, threshold)
        finally:
            compiled.set_compiled_kernels(bool(devices), cuda="cuda" in devices)

    return Implementation(OURS_EAGER, clip)


def _composer(clipping_type: str) -> Implementation:
    """Composer's functional form, as its ``GradientClipping`` algorithm calls it outside FSDP."""

    def clip(model: nn.Module, threshold: float) -> None:
        composer_apply_gradient_clipping(model, clipping_type, threshold, fsdp_enabled=False)

    return Implementation(COMPOSER, clip)


IMPLEMENTATIONS: dict[str, tuple[Implementation, ...]] = {
    "norm": (
        _ours("norm"),
        _ours_eager("norm"),
        Implementation(
            "torch clip_grad_norm_", lambda model, t: nn.utils.clip_grad_norm_(model.parameters(), t)
        ),
        _composer("norm"),
    ),
    "value": (
        _ours("value"),
        _ours_eager("value"),
        Implementation(
            OURS_WITHOUT_STATS,
            lambda model, threshold: apply_gradient_clipping(model, "value", threshold, with_stats=False),
        ),
        Implementation(
            OURS_CLIPPED_FLAG,
            lambda model, threshold: apply_gradient_clipping(model, "value", threshold, with_stats="clipped"),
        ),
        Implementation(
            "torch clip_grad_value_", lambda model, t: nn.utils.clip_grad_value_(model.parameters(), t)
        ),
        _composer("value"),
    ),
    "adaptive": (
        _ours("adaptive"),
        _composer("adaptive"),
        Implementation(
            "timm adaptive_clip_grad", lambda model, t: timm_adaptive_clip_grad(model.parameters(), t)
        ),
    ),
}
"""Per clipping type, ours first."""

REFERENCE = {
    "norm": "torch clip_grad_norm_",
    "value": "torch clip_grad_value_",
    "adaptive": "timm adaptive_clip_grad",
}
"""The implementation whose clipped grads every other one must reproduce."""


READ_PASSES: dict[str, Callable[[list[Tensor]], object]] = {
    "_foreach_norm": lambda tensors: torch._foreach_norm(tensors),
    "dot": lambda tensors: [torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensors],
    "sum": lambda tensors: [t.sum() for t in tensors],
}
"""Ways to read every element once."""

WRITE_PASSES: dict[str, Callable[[list[Tensor], Tensor], object]] = {
    "_foreach_mul_": lambda tensors, one: torch._foreach_mul_(tensors, one),
    "mul_": lambda tensors, one: [t.mul_(one) for t in tensors],
}
"""Ways to rewrite every element in place (multiplying by a 0-d tensor holding 1)."""


def floor_candidates(tensors: list[Tensor]) -> dict[str, Callable[[], None]]:
    """The least any clipping rule does: one read pass, then one in-place pass, over ``tensors``.

    One call per pair of a read and a write pass; the fastest pair, measured in the same run, is the floor.
    """
    one = torch.ones((), device=tensors[0].device, dtype=tensors[0].dtype)

    def read_then_write(read: Callable[[list[Tensor]], object], write: Callable[..., object]) -> None:
        read(tensors)
        write(tensors, one)

    return {
        f"{FLOOR} ({read_name} + {write_name})": partial(read_then_write, read, write)
        for read_name, read in READ_PASSES.items()
        for write_name, write in WRITE_PASSES.items()
    }


def deviations_from_reference(
    model: nn.Module, reset: Callable[[], None], thresholds: dict[str, float]
) -> dict[tuple[str, str], float]:
    """``max_i ‖g_i - r_i‖_∞ / max_i ‖r_i‖_∞`` per (clipping type, implementation): g the grads it left,
    r those the reference left, both from the grads that ``reset()`` restores. Allocates one copy of the
    grads (fresh full-size allocations are slow on a large model) and leaves the grads to be reset."""
    grads = [param.grad for param in model.parameters()]
    expected = [torch.empty_like(grad) for grad in grads]
    deviations = {}
    for clipping_type, implementations in IMPLEMENTATIONS.items():
        threshold = thresholds[clipping_type]
        reference = next(impl for impl in implementations if impl.label == REFERENCE[clipping_type])
        reset()
        reference.clip(model, threshold)
        torch._foreach_copy_(expected, grads)
        largest = _max_abs(expected)
        for implementation in implementations:
            reset()
            implementation.clip(model, threshold)
            torch._foreach_sub_(grads, expected)
            deviations[(clipping_type, implementation.label)] = _max_abs(grads) / largest
    return deviations


def _max_abs(tensors: list[Tensor]) -> float:
    """``max_i max|t_i|``, without full-size temporaries."""
    return torch.stack([torch.stack(torch.aminmax(tensor)).abs().max() for tensor in tensors]).max().item()
