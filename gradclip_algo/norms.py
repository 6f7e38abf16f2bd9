"""Gradient norms, accumulated in fp32, without host synchronisation.

A p-norm over many tensors is ``root(Σ_i power_sum(g_i))`` with ``power_sum(g) = Σ|g|^p`` (``max|g|`` for
p = inf). Power sums are what add up across tensors, devices and ranks, so they are what this module
computes; :class:`~gradclip_algo.distributed.Shards` adds them up across ranks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

# On CPU, BLAS dot is about twice as fast as vector_norm for the sum of squares of a large fp32 tensor.
_CPU_DOT_MIN_NUMEL = 1 << 14

GroupKey = tuple[torch.device, torch.dtype]


def group_by_device_and_dtype(tensors: Iterable[Tensor]) -> dict[GroupKey, list[int]]:
    """Indices of ``tensors`` grouped so that each group can go to one foreach kernel."""
    groups: dict[GroupKey, list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(index)
    return groups


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _uses_cpu_dot(tensor: Tensor, norm_type: float) -> bool:
    return (
        norm_type == 2.0
        and tensor.device.type == "cpu"
        and tensor.dtype in (torch.float32, torch.float64)
        and tensor.numel() >= _CPU_DOT_MIN_NUMEL
        and tensor.is_contiguous()
    )


def _group_power_sums(tensors: list[Tensor], norm_type: float) -> list[Tensor]:
    """Per-tensor power sums (0-d, fp32 or fp64) for tensors on one device with one dtype, in order."""
    sums: list[Tensor | None] = [None] * len(tensors)
    rest = []
    for index, tensor in enumerate(tensors):
        if _uses_cpu_dot(tensor, norm_type):
            sums[index] = torch.dot(tensor.view(-1), tensor.view(-1))
        else:
            rest.append(index)
    if rest:
        group = [tensors[i] for i in rest]
        norms = torch._foreach_norm(group, norm_type, dtype=_accumulation_dtype(group[0].dtype))
        if not math.isinf(norm_type):
            norms = torch._foreach_pow(norms, norm_type)
        for index, value in zip(rest, norms, strict=True):
            sums[index] = value
    return sums


def power_sums(tensors: list[Tensor], norm_type: float, device: torch.device | None = None) -> Tensor:
    """1-D fp32 tensor on ``device`` (default: the first tensor's) of ``Σ|t_i|^p`` (``max|t_i|`` for inf).

    Entry ``i`` belongs to ``tensors[i]``. Tensors are grouped by device and dtype, large fp32 CPU tensors
    use BLAS dot (p = 2), the rest one foreach kernel per group.
    """
    device = device if device is not None else tensors[0].device
    if not tensors:
        return torch.zeros(0, dtype=torch.float32, device=device)
    groups = group_by_device_and_dtype(tensors)
    if len(groups) == 1:
        return torch.stack(_group_power_sums(tensors, norm_type)).to(device, torch.float32)
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for indices in groups.values():
        group = [tensors[i] for i in indices]
        sums = torch.stack(_group_power_sums(group, norm_type)).to(device, torch.float32)
        out[torch.tensor(indices, device=device)] = sums
    return out


def root(power_sum: Tensor, norm_type: float) -> Tensor:
    """The p-norm from a power sum: ``s^(1/p)`` (``s`` itself for p = inf)."""
    return power_sum if math.isinf(norm_type) else power_sum.pow(1.0 / norm_type)


def combine(power_sums: Tensor, norm_type: float) -> Tensor:
    """Power sums of parts -> the power sum of the whole: their sum (their max for p = inf)."""
    if power_sums.numel() == 0:
        return power_sums.new_zeros(())
    return power_sums.max() if math.isinf(norm_type) else power_sums.sum()


def global_norm(tensors: list[Tensor], norm_type: float = 2.0, device: torch.device | None = None) -> Tensor:
    """The p-norm of all local tensors together, as if concatenated into one vector (fp32, 0-d)."""
    return root(combine(power_sums(tensors, norm_type, device), norm_type), norm_type)


def unit_norms(tensor: Tensor) -> Tensor:
    """L2 norm of each unit (fp32, fp64 for fp64): over every dim but the first for 2+ dims, else all of it.

    For a Linear weight a unit is an output row, for a Conv weight an output filter (Brock et al. 2021).
    The result keeps the reduced dims (size 1) so it broadcasts against ``tensor``.
    """
    accumulate = _accumulation_dtype(tensor.dtype)
    if tensor.ndim <= 1:
        return torch.linalg.vector_norm(tensor, dtype=accumulate)
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.ndim)), keepdim=True, dtype=accumulate)
