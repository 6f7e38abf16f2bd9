"""Clipping by value (Mikolov 2012, "Statistical language models based on neural networks")."""

from __future__ import annotations

from collections import defaultdict

import torch

from gradclip_algo import kernels
from gradclip_algo.distributed import Shards
from gradclip_algo.norms import group_by_device_and_dtype, sum_dtype
from gradclip_algo.options import NoOptions
from gradclip_algo.stats import ClipStats


def clamp_grads_(shards: Shards, clip_value: float) -> None:
    """``g ← clamp(g, -λ, λ)`` for every grad element, in place; as ``torch.nn.utils.clip_grad_value_``."""
    for indices in group_by_device_and_dtype(shards.grads).values():
        kernels.clamp_([shards.grads[i] for i in indices], clip_value)


def clamp_grads_flagging_(shards: Shards, clip_value: float) -> torch.Tensor:
    """:func:`clamp_grads_`, and whether it clipped anything: whether an element of any grad of any rank
    has ``|g| > λ`` (0-d bool; compared in each grad's dtype, as the clamp is), counted in the clamping pass
    (:func:`~gradclip_algo.kernels.clamp_with_stats_`). A NaN element does not count."""
    flags = []
    for indices in group_by_device_and_dtype(shards.grads).values():
        _, count, _ = kernels.clamp_with_stats_([shards.grads[i] for i in indices], clip_value)
        flags.append(count.gt(0).to(shards.device, torch.float32))
    if not flags:  # a rank without grads still joins the reduction
        flags.append(torch.zeros((), dtype=torch.float32, device=shards.device))
    return shards.total(torch.stack(flags), maximum=True) > 0


def clip_by_value(shards: Shards, clip_value: float, options: NoOptions) -> ClipStats:
    """``g ← clamp(g, -λ, λ)`` for every element; an elementwise clamp on every layout.

    Statistics: the L2 norms before and after, and the share of elements with ``|g| > λ``, taken in the
    same pass as the clamp (:func:`~gradclip_algo.kernels.clamp_with_stats_`), per way the grads are split
    (:attr:`Shards.reduction`), device and dtype, then summed over ranks.
    """
    by_way: dict[int, list[int]] = defaultdict(list)
    for i, way in enumerate(shards.reduction):
        by_way[way].append(i)
    dtype, device = sum_dtype(shards.grads), shards.device
    ways: list[int] = []
    sums: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    numels: list[int] = []
    for way, members in by_way.items():
        grads = [shards.grads[i] for i in members]
        for indices in group_by_device_and_dtype(grads).values():
            group = [grads[i] for i in indices]
            before, count, after = kernels.clamp_with_stats_(group, clip_value)
            ways.append(way)
            sums.append(torch.stack([before, after]).to(device, dtype))
            counts.append(count.to(device))
            numels.append(sum(g.numel() for g in group))
    if not ways:  # a rank without grads still joins the reductions
        sums.append(torch.zeros(2, dtype=dtype, device=device))
        counts.append(torch.zeros((), dtype=torch.int64, device=device))
        ways.append(0)
        numels.append(0)
    norm, clipped_norm = shards.total(torch.stack(sums), partial=ways).sqrt().unbind()
    count = torch.stack([torch.stack(counts), torch.tensor(numels, dtype=torch.int64).to(device)], dim=1)
    clipped, numel = shards.total(count, partial=ways).unbind()
    return ClipStats(norm, clipped_norm, clipped.to(torch.float32) / numel.clamp(min=1).to(torch.float32))
