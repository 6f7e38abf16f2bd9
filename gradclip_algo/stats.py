"""What one clipping call did, as device tensors (reading them as Python numbers is the caller's sync)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClipStats:
    """Statistics of one clipping call: 0-d tensors on the grads' device, and one host bool.

    The norms are float32, or float64 when a grad is float64 (so that a float64 norm beyond float32's
    range stays finite); ``clipped_fraction`` is float32.

    Attributes:
        grad_norm: global norm of the grads before clipping (the clipping p-norm for ``'norm'``, L2
            otherwise).
        clipped_grad_norm: the same norm after clipping.
        clipped_fraction: share of what was clipped: 0 or 1 for ``'norm'``, of elements for
            ``'value'``, of units for ``'adaptive'``.
        skipped: ``True`` when the step was skipped (every grad set to ``None``); deciding that is a
            host-side decision, so it is a Python bool.
    """

    grad_norm: Tensor
    clipped_grad_norm: Tensor
    clipped_fraction: Tensor
    skipped: bool = False

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> ClipStats:
        """Stats of a call that found no grads: all zeros."""
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return cls(zero, zero, zero)

    @classmethod
    def skipped_step(cls, grad_norm: Tensor) -> ClipStats:
        """Stats of a skipped step: the measured norm, nothing left after it, everything clipped."""
        return cls(grad_norm, torch.zeros_like(grad_norm), torch.ones_like(grad_norm), skipped=True)

    def as_dict(self) -> dict[str, float]:
        """The fields as Python floats. This synchronises with the device."""
        return {
            "grad_norm": float(self.grad_norm),
            "clipped_grad_norm": float(self.clipped_grad_norm),
            "clipped_fraction": float(self.clipped_fraction),
            "skipped": float(self.skipped),
        }
