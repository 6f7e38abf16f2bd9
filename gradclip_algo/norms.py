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

from gradclip_algo.blocks import block_size, packed_blocks

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
    """The power sum of one contiguous CPU tensor (a large grad, or a block of packed small ones) by the
    fastest kernel: BLAS dot for p = 2 (2x vector_norm), aminmax for p = inf (10x torch's CPU inf-norm)."""
    if norm_type == 2.0:
        return torch.dot(tensor.view(-1), tensor.view(-1))
    return torch.stack(torch.aminmax(tensor)).abs().max()


def _has_cpu_kernel(tensor: Tensor, norm_type: float) -> bool:
    """Whether :func:`_cpu_power_sum` serves tensors like ``tensor``."""
    special = (norm_type == 2.0 and tensor.dtype in (torch.float32, torch.float64)) or math.isinf(norm_type)
    return special and tensor.device.type == "cpu"


def _group_power_sums(tensors: list[Tensor], norm_type: float) -> Tensor:
    """Per-tensor power sums (1-D, fp32 or fp64) for tensors on one device with one dtype, in order."""
    first = tensors[0]
    accumulate = _accumulation_dtype(first.dtype)
    numels = [t.numel() for t in tensors]
    large = []
    if _has_cpu_kernel(first, norm_type):
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


def _group_power_sum(tensors: list[Tensor], norm_type: float) -> Tensor:
    """The power sum of all ``tensors`` (one device, one dtype) together, 0-d fp32 or fp64.

    On CPU, tensors under 16 K elements are copied a pack at a time into a cache-sized block
    (:func:`~gradclip_algo.blocks.packed_blocks`) that goes to one BLAS dot (p = 2) or aminmax (p = inf):
    a few kernels instead of one per tensor. Elsewhere: per-tensor sums, one foreach kernel.
    """
    first = tensors[0]
    if not _has_cpu_kernel(first, norm_type):
        return combine(_group_power_sums(tensors, norm_type), norm_type)
    numels = [t.numel() for t in tensors]
    small = [t for t, n in zip(tensors, numels, strict=True) if 0 < n < _CPU_DOT_MIN_NUMEL]
    large = [t for t, n in zip(tensors, numels, strict=True) if n >= _CPU_DOT_MIN_NUMEL]
    size = block_size(first.device, sum(numels))
    parts = [_cpu_power_sum(block.view(-1), norm_type) for _, block in packed_blocks(small, size)]
    parts += [_cpu_power_sum(t, norm_type) for t in large if t.is_contiguous()]
    strided = [t for t in large if not t.is_contiguous()]
    if strided:
        parts.append(combine(_group_power_sums(strided, norm_type), norm_type))
    if not parts:  # only empty tensors
        return torch.zeros((), dtype=_accumulation_dtype(first.dtype), device=first.device)
    return combine(torch.stack(parts).to(_accumulation_dtype(first.dtype)), norm_type)


def power_sum(tensors: list[Tensor], norm_type: float, device: torch.device | None = None) -> Tensor:
    """The power sum of all ``tensors`` together, ``Σ_i Σ|t_i|^p`` (``max_i max|t_i|`` for inf), as a 0-d
    fp32 tensor on ``device`` (default: the first tensor's); 0 for no tensors.

    Cheaper than combining :func:`power_sums` where per-tensor sums are not needed (see
    :func:`_group_power_sum`).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    device = device if device is not None else tensors[0].device
    groups = group_by_device_and_dtype(tensors)
    if len(groups) == 1:
        return _group_power_sum(tensors, norm_type).to(device, torch.float32)
    sums = [
        _group_power_sum([tensors[i] for i in indices], norm_type).to(device, torch.float32)
        for indices in groups.values()
    ]
    return combine(torch.stack(sums), norm_type)


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
    return root(power_sum(tensors, norm_type, device), norm_type)


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
