"""Gradient norms, accumulated in fp32, without host synchronisation.

A p-norm over many tensors is computed as ``root(Σ_i power_sum(g_i))`` where
``power_sum(g) = Σ|g|^p`` (``max|g|`` for p = inf). Power sums are what add up across tensors, devices and
ranks, so they are the quantity this module hands around.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

# On CPU, BLAS dot is about twice as fast as vector_norm for the sum of squares of a large fp32 tensor.
_CPU_DOT_MIN_NUMEL = 1 << 14


def group_by_device_and_dtype(
    tensors: Iterable[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """Tensors grouped so each group can go to one foreach kernel."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        groups[(tensor.device, tensor.dtype)].append(tensor)
    return groups


def _cpu_sum_of_squares(tensor: Tensor) -> Tensor:
    flat = tensor.view(-1)
    return torch.dot(flat, flat).to(torch.float32)


def _group_power_sums(tensors: list[Tensor], norm_type: float) -> Tensor:
    """1-D fp32 tensor of per-tensor power sums for tensors on one device with one dtype."""
    sums = []
    first = tensors[0]
    if norm_type == 2.0 and first.device.type == "cpu" and first.dtype in (torch.float32, torch.float64):
        large = [t for t in tensors if t.numel() >= _CPU_DOT_MIN_NUMEL and t.is_contiguous()]
        sums = [_cpu_sum_of_squares(t) for t in large]
        tensors = [t for t in tensors if not (t.numel() >= _CPU_DOT_MIN_NUMEL and t.is_contiguous())]
    if tensors:
        # fp64 grads are reduced in fp64 (vector_norm refuses to narrow); everything else in fp32
        accumulate = None if first.dtype == torch.float64 else torch.float32
        norms = torch._foreach_norm(tensors, norm_type, dtype=accumulate)
        sums.extend(norms if math.isinf(norm_type) else torch._foreach_pow(norms, norm_type))
    return torch.stack(sums).to(torch.float32)


def power_sum(tensors: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """``Σ_i Σ|t_i|^p`` (``max_i max|t_i|`` for p = inf) over all tensors, as a 0-d fp32 tensor on ``device``."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    parts = [
        _group_power_sums(group, norm_type).to(device)
        for group in group_by_device_and_dtype(tensors).values()
    ]
    stacked = torch.cat(parts)
    return stacked.max() if math.isinf(norm_type) else stacked.sum()


def root(power_sum: Tensor, norm_type: float) -> Tensor:
    """The p-norm from a power sum: ``s^(1/p)`` (``s`` itself for p = inf)."""
    return power_sum if math.isinf(norm_type) else power_sum.pow(1.0 / norm_type)


def global_norm(tensors: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """The p-norm of all tensors together, as if concatenated into one vector (fp32, 0-d, on ``device``)."""
    return root(power_sum(tensors, norm_type, device), norm_type)


def unit_norms(tensor: Tensor) -> Tensor:
    """L2 norm of each unit (fp32, fp64 for fp64): over every dim but the first for 2+ dims, else all of it.

    For a Linear weight a unit is an output row, for a Conv weight an output filter (Brock et al. 2021).
    The result keeps the reduced dims (size 1) so it broadcasts against ``tensor``.
    """
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if tensor.ndim <= 1:
        return torch.linalg.vector_norm(tensor, dtype=accumulate)
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.ndim)), keepdim=True, dtype=accumulate)
