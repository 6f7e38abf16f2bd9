"""A bounded history of global grad norms on the device: a ring buffer that only finite norms enter.

``count`` finite norms were recorded; the first ``min(count, window)`` slots hold the last of them (in
ring order) and the others are empty, held as 0 so that a checkpoint compares equal to its copy.
:func:`recorded` masks the empty slots out without a host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.validation import check_state_tensor


def statistics_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of norm statistics: float64, wide enough for the square of any float32 or float64 norm
    (float32 on MPS, which has no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def empty_history(window: int, device: torch.device | str) -> dict[str, Tensor]:
    """``norms``: ``window`` empty slots (:func:`statistics_dtype`); ``count``: how many finite norms were
    recorded (int64)."""
    return {
        "norms": torch.zeros((window,), dtype=statistics_dtype(device), device=device),
        "count": torch.zeros((), dtype=torch.int64, device=device),
    }


def recorded(history: dict[str, Tensor]) -> Tensor:
    """Which slots hold a recorded norm (a bool mask on the device)."""
    norms = history["norms"]
    return torch.arange(norms.numel(), device=norms.device) < history["count"]


def check_history(field: str, history: dict[str, Tensor]) -> None:
    """``ValueError`` unless ``history`` could have been made by :func:`record_`: a count ≥ 0, finite
    norms ≥ 0 in the first ``min(count, window)`` slots, 0 or NaN in the others (NaN: checkpoints written
    before empty slots were 0). Empty slots are then set to 0. Reads the values (a sync)."""
    norms = check_state_tensor(f"{field}.norms", history["norms"], statistics_dtype("cpu"), ndim=1)
    count = int(check_state_tensor(f"{field}.count", history["count"], torch.int64, ndim=0))
    if count < 0:
        raise ValueError(f"{field}.count: expected an integer >= 0, got {count}")
    filled = min(count, norms.numel())
    values = norms.detach().cpu()
    if not (torch.isfinite(values[:filled]).all() and (values[:filled] >= 0).all()):
        raise ValueError(f"{field}.norms: the {filled} recorded norms must be finite and >= 0")
    empty = values[filled:]
    if not (torch.isnan(empty) | (empty == 0)).all():
        raise ValueError(f"{field}.norms: slots after the {filled} recorded norms must be 0 (empty)")
    with torch.no_grad():
        norms[filled:] = 0.0


def record_(history: dict[str, Tensor], norm: Tensor) -> None:
    """Write ``norm`` over the oldest slot if it is finite; a non-finite norm leaves the history as it is."""
    norms, count = history["norms"], history["count"]
    norm = norm.to(norms.dtype)
    finite = torch.isfinite(norm)
    slot = (count % norms.numel()).view(1)
    norms.index_copy_(0, slot, torch.where(finite, norm, norms.index_select(0, slot).squeeze(0)).view(1))
    count.add_(finite.to(count.dtype))


def mean_and_std(history: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and sample standard deviation (ddof 1) of the recorded norms, and how many there are."""
    norms, mask = history["norms"], recorded(history)
    count = mask.sum()
    mean = torch.where(mask, norms, 0.0).sum() / count.clamp(min=1)
    variance = torch.where(mask, (norms - mean).square(), 0.0).sum() / (count - 1).clamp(min=1)
    return mean, variance.sqrt(), count
