"""Gradient norms, accumulated in fp32, without host synchronisation.

A p-norm over many tensors is ``root(Σ_i power_sum(g_i))`` with ``power_sum(g) = Σ|g|^p`` (``max|g|`` for
p = inf). Power sums are what add up across tensors, devices and ranks, so they are what this module
computes; :class:`~gradclip_algo.distributed.Shards` adds them up across ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

# On CPU, BLAS dot is about twice as fast as vector_norm for the sum of squares of a large fp32 tensor.
_CPU_DOT_MIN_NUMEL = 1 << 14

GroupKey = tuple[torch.device, torch.dtype]


def group_by_device_and_dtype(tensors: list[Tensor]) -> dict[GroupKey, list[int]]:
    """Indices of ``tensors`` grouped by device and dtype, so that each group can go to one foreach kernel."""
    if not tensors:
        return {}
    grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)
    return {key: indices for key, (_, indices) in grouped.items()}


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_power_sum(tensor: Tensor, norm_type: float) -> Tensor:
    """The power sum of one large contiguous CPU tensor by the fastest kernel: BLAS dot for p = 2 (2x
    vector_norm), aminmax for p = inf (10x torch's CPU inf-norm)."""
    if norm_type == 2.0:
        return torch.dot(tensor.view(-1), tensor.view(-1))
    return torch.stack(torch.aminmax(tensor)).abs().max()


def _group_power_sums(tensors: list[Tensor], norm_type: float) -> Tensor:
    """Per-tensor power sums (1-D, fp32 or fp64) for tensors on one device with one dtype, in order."""
    first = tensors[0]
    accumulate = _accumulation_dtype(first.dtype)
    numels = [t.numel() for t in tensors]
    special = (norm_type == 2.0 and first.dtype in (torch.float32, torch.float64)) or math.isinf(norm_type)
    large = []
    if first.device.type == "cpu" and special:
        large = [i for i, n in enumerate(numels) if n >= _CPU_DOT_MIN_NUMEL and tensors[i].is_contiguous()]
    if not large and all(numels):  # the common case for many small tensors: one foreach kernel
        norms = torch.stack(torch._foreach_norm(tensors, norm_type, dtype=accumulate))
        return norms if math.isinf(norm_type) else norms.pow(norm_type)
    chosen = set(large)
    rest = [i for i, n in enumerate(numels) if n and i not in chosen]  # empty tensors add 0
    sums = torch.zeros(len(tensors), dtype=accumulate, device=first.device)
    if large:
        sums[large] = torch.stack([_cpu_power_sum(tensors[i], norm_type) for i in large]).to(accumulate)
    if rest:  # (the inf-norm kernel refuses empty tensors)
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in rest], norm_type, dtype=accumulate))
        sums[rest] = norms if math.isinf(norm_type) else norms.pow(norm_type)
    return sums


def power_sums(tensors: list[Tensor], norm_type: float, device: torch.device | None = None) -> Tensor:
    """1-D fp32 tensor on ``device`` (default: the first tensor's) of ``Σ|t_i|^p`` (``max|t_i|`` for inf).

    Entry ``i`` belongs to ``tensors[i]``. Tensors are grouped by device and dtype, large fp32 CPU tensors
    use BLAS dot (p = 2), the rest one foreach kernel per group.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float32, device=device)
    device = device if device is not None else tensors[0].device
    groups = group_by_device_and_dtype(tensors)
    if len(groups) == 1:
        return _group_power_sums(tensors, norm_type).to(device, torch.float32)
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for indices in groups.values():
        sums = _group_power_sums([tensors[i] for i in indices], norm_type)
        out[torch.tensor(indices, device=device)] = sums.to(device, torch.float32)
    return out


def sum_of_squares(tensor: Tensor) -> Tensor:
    """``Σ t²`` as a 0-d tensor in fp32 (fp64 for fp64): BLAS dot for fp32/fp64 on CPU, else vector_norm²."""
    flat = tensor.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(flat, dtype=_accumulation_dtype(flat.dtype)).square()


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


def unit_ndim(tensor: Tensor) -> int:
    """How many trailing dims make one AGC unit: all but the first for 2+ dims, else the whole tensor."""
    return tensor.ndim - 1 if tensor.ndim >= 2 else tensor.ndim


def unit_norms(tensor: Tensor, ndim: int | None = None) -> Tensor:
    """L2 norm of each unit over the last ``ndim`` dims (default :func:`unit_ndim`), kept broadcastable.

    For a Linear weight a unit is an output row, for a Conv weight an output filter (Brock et al. 2021);
    for a stack of tensors pass the unit dims of one of them. Accumulated in fp32 (fp64 for fp64).
    """
    ndim = unit_ndim(tensor) if ndim is None else ndim
    accumulate = _accumulation_dtype(tensor.dtype)
    if ndim == 0:
        return tensor.abs().to(accumulate)
    dims = tuple(range(tensor.ndim - ndim, tensor.ndim))
    return torch.linalg.vector_norm(tensor, dim=dims, keepdim=True, dtype=accumulate)
