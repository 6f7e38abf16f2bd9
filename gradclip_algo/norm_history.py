"""A bounded history of global grad norms on the device: a ring buffer that only finite norms enter.

Empty slots hold NaN, so NaN-ignoring reductions (``torch.nanquantile``, masked sums) see exactly the norms
recorded so far, however full the window is, without a host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor


def empty_history(window: int, device: torch.device | str) -> dict[str, Tensor]:
    """``norms``: ``window`` fp32 slots, all NaN; ``count``: how many finite norms were recorded (int64)."""
    return {
        "norms": torch.full((window,), float("nan"), dtype=torch.float32, device=device),
        "count": torch.zeros((), dtype=torch.int64, device=device),
    }


def record_(history: dict[str, Tensor], norm: Tensor) -> None:
    """Write ``norm`` over the oldest slot if it is finite; a non-finite norm leaves the history as it is."""
    norms, count = history["norms"], history["count"]
    finite = torch.isfinite(norm)
    slot = (count % norms.numel()).view(1)
    norms.index_copy_(0, slot, torch.where(finite, norm, norms.index_select(0, slot).squeeze(0)).view(1))
    count.add_(finite.to(count.dtype))


def mean_and_std(history: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and sample standard deviation (ddof 1) of the recorded norms, and how many there are."""
    norms = history["norms"]
    recorded = torch.isfinite(norms)
    count = recorded.sum()
    mean = torch.where(recorded, norms, 0.0).sum() / count.clamp(min=1)
    variance = torch.where(recorded, (norms - mean).square(), 0.0).sum() / (count - 1).clamp(min=1)
    return mean, variance.sqrt(), count
