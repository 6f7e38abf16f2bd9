"""What one clipping call did, as device tensors (reading them as Python numbers is the caller's sync)."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
        skipped: whether the step was skipped: a Python bool when the grads were set to ``None`` (a host
            decision), a 0-d bool tensor when the skip was folded into the optimizer's ``found_inf``.
        coefficient: for the types that clip by one factor (``norm``, ``quantile``, ``zscore``): that
            factor, ``min(1, τ / (‖G‖ + 1e-6))``; ``None`` for the others and on an unfolded skip.
        threshold: for the same types: the global norm above which this step clips (λ for ``norm``; the
            capped percentile for ``quantile``; for ``zscore`` ``min(μ + z_t·(sigma + 1e-6), λ)``, λ in warm-up), in
            the dtype the rule compared in; ``None`` for the others.
        folded: whether the factor or the skip was handed to the optimizer's next ``step()`` (see
            :mod:`gradclip_algo.folding`) instead of being applied to the grads.
    """

    grad_norm: Tensor
    clipped_grad_norm: Tensor
    clipped_fraction: Tensor
    skipped: bool | Tensor = False
    coefficient: Tensor | None = None
    threshold: Tensor | None = None
    folded: bool = False

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> ClipStats:
        """Stats of a call that found no grads: all zeros."""
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return cls(zero, zero, zero)

    @classmethod
    def clipped_only(cls, clipped: Tensor) -> ClipStats:
        """Stats of a call that measured only whether it clipped anything (``with_stats='clipped'``): the
        device flag ``clipped`` as a ``clipped_fraction`` of 1.0 or 0.0, and NaN norms (not measured)."""
        nan = torch.full((), float("nan"), dtype=torch.float32, device=clipped.device)
        return cls(nan, nan, clipped.to(torch.float32))

    @classmethod
    def skipped_step(cls, grad_norm: Tensor) -> ClipStats:
        """Stats of a skipped step: the measured norm, nothing left after it, everything clipped."""
        everything = torch.ones((), dtype=torch.float32, device=grad_norm.device)
        return cls(grad_norm, torch.zeros_like(grad_norm), everything, skipped=True)

    def skipped_where(self, skip: Tensor) -> ClipStats:
        """These stats where the device flag ``skip`` is false, those of a skipped step where it is true
        (nothing left after clipping, everything clipped); no host sync."""
        return replace(
            self,
            clipped_grad_norm=torch.where(skip, 0.0, self.clipped_grad_norm),
            clipped_fraction=torch.where(skip, 1.0, self.clipped_fraction),
            skipped=skip,
        )

    def as_dict(self) -> dict[str, float]:
        """The fields as Python floats. This synchronises with the device."""
        return {
            "grad_norm": float(self.grad_norm),
            "clipped_grad_norm": float(self.clipped_grad_norm),
            "clipped_fraction": float(self.clipped_fraction),
            "skipped": float(self.skipped),
        }
