"""Clipping by value (Mikolov 2012, "Statistical language models based on neural networks")."""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.norms import global_norm
from gradclip_algo.stats import ClipStats


def clip_grad_value(params: list[Tensor], clip_value: float) -> ClipStats:
    """Clamp every grad element to ``[-λ, λ]``, in place, one pass over each grad."""
    grads = [p.grad for p in params]
    device = grads[0].device
    grad_norm = global_norm(grads, 2.0, device)
    clipped = torch.stack([(g.abs() > clip_value).sum().to(device) for g in grads]).sum()
    for grad in grads:
        grad.clamp_(-clip_value, clip_value)
    numel = sum(g.numel() for g in grads)
    return ClipStats(
        grad_norm=grad_norm,
        clipped_grad_norm=global_norm(grads, 2.0, device),
        clipped_fraction=clipped.to(torch.float32) / max(numel, 1),
    )
