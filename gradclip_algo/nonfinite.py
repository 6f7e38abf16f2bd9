"""What to do when a gradient holds inf or NaN."""

from __future__ import annotations

import torch
from torch import Tensor

NONFINITE_MODES = ("propagate", "error", "skip", "zero")
"""``propagate`` (default): clip as torch does, no check, no host sync; inf/NaN reach the optimizer and
show in ``ClipStats.grad_norm``. ``error``: raise :class:`NonFiniteGradError` (syncs). ``skip``: set every
grad to ``None`` so ``optimizer.step()`` leaves weights and optimizer state untouched (syncs). ``zero``:
replace inf/NaN elements by 0 and clip the rest (no sync, one extra pass)."""


class NonFiniteGradError(RuntimeError):
    """A gradient holds inf or NaN and ``nonfinite='error'`` was asked for."""

    def __init__(self, message: str, param_name: str | None) -> None:
        super().__init__(message)
        self.param_name = param_name


def zero_nonfinite_(grads: list[Tensor]) -> None:
    """Replace every inf and NaN grad element by 0, in place."""
    for grad in grads:
        grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def first_nonfinite(named_params: list[tuple[str | None, Tensor]]) -> str:
    """Name of the first parameter whose grad holds inf or NaN (syncs; for error messages)."""
    for index, (name, param) in enumerate(named_params):
        if not bool(torch.isfinite(param.grad).all()):
            return name or f"parameter #{index}"
    return "none (the global norm overflowed fp32)"
