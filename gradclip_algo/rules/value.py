"""Clipping by value (Mikolov 2012, "Statistical language models based on neural networks")."""

from __future__ import annotations

import torch

from gradclip_algo import kernels
from gradclip_algo.distributed import Shards
from gradclip_algo.norms import group_by_device_and_dtype, power_sums
from gradclip_algo.options import NoOptions
from gradclip_algo.stats import ClipStats


def clamp_grads_(shards: Shards, clip_value: float) -> None:
    """``g ← clamp(g, -λ, λ)`` for every grad element, in place; as ``torch.nn.utils.clip_grad_value_``."""
    for indices in group_by_device_and_dtype(shards.grads).values():
        kernels.clamp_([shards.grads[i] for i in indices], clip_value)


def _clipped_counts(shards: Shards, clip_value: float) -> torch.Tensor:
    """``#{|g| > λ}`` per grad, 1-D on the shards' device."""
    counts = torch.zeros(len(shards.grads), dtype=torch.int64, device=shards.device)
    for indices in group_by_device_and_dtype(shards.grads).values():
        found = kernels.count_beyond([shards.grads[i] for i in indices], clip_value)
        counts[torch.tensor(indices, device=shards.device)] = found.to(shards.device)
    return counts


def clip_by_value(shards: Shards, clip_value: float, options: NoOptions) -> ClipStats:
    """``g ← clamp(g, -λ, λ)`` for every element; an elementwise clamp on every layout.

    Statistics: the L2 norms before and after, and the share of elements with ``|g| > λ``.
    """
    norm = shards.global_norm(2.0)
    counts = _clipped_counts(shards, clip_value)
    numels = torch.tensor([g.numel() for g in shards.grads], dtype=torch.int64).to(shards.device)
    clamp_grads_(shards, clip_value)
    after = shards.total(power_sums(shards.grads, 2.0, shards.device)).sqrt()
    clipped, numel = shards.total(counts), shards.total(numels)
    return ClipStats(norm, after, clipped.to(torch.float32) / numel.clamp(min=1).to(torch.float32))
