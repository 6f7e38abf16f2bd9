"""Clipping by value (Mikolov 2012, "Statistical language models based on neural networks")."""

from __future__ import annotations

import torch

from gradclip_algo.distributed import Shards
from gradclip_algo.norms import power_sums
from gradclip_algo.stats import ClipStats


def clip_grad_value(shards: Shards, clip_value: float) -> ClipStats:
    """Clamp every grad element to ``[-λ, λ]``, in place; an elementwise clamp on every layout."""
    grads, device = shards.grads, shards.device
    squares_before = power_sums(grads, 2.0, device)
    clipped = torch.stack([(g.abs() > clip_value).sum().to(device) for g in grads])
    for grad in grads:
        grad.clamp_(-clip_value, clip_value)
    numel = torch.tensor([g.numel() for g in grads], dtype=torch.float32).to(device, non_blocking=True)
    return ClipStats(
        grad_norm=shards.total(squares_before).sqrt(),
        clipped_grad_norm=shards.total(power_sums(grads, 2.0, device)).sqrt(),
        clipped_fraction=shards.total(clipped.to(torch.float32)) / shards.total(numel).clamp(min=1),
    )
