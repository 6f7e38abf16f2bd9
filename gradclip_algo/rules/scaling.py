"""In-place scaling of many grads by one device scalar."""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.norms import group_by_device_and_dtype


def scale_(grads: list[Tensor], coef: Tensor) -> None:
    """``g ← g · coef`` for every grad, one foreach kernel per device and dtype; ``coef`` is a 0-d tensor."""
    groups = group_by_device_and_dtype(grads)
    if len(groups) == 1:
        torch._foreach_mul_(grads, coef.to(grads[0].device, non_blocking=True))
        return
    coef_by_device: dict[torch.device, Tensor] = {}
    for (device, _), indices in groups.items():
        if device not in coef_by_device:
            coef_by_device[device] = coef.to(device, non_blocking=True)
        torch._foreach_mul_([grads[i] for i in indices], coef_by_device[device])
