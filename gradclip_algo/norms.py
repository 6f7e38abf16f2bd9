"""The total norm of many grads and their scaling by a clipping coefficient, as torch's
``get_total_norm`` and ``clip_grads_with_norm_``, without host synchronisation.

Every norm-based type (``norm``, ``quantile``, ``zscore``, the warm-up of ``adagc``) clips with
:func:`clip_coefficient`; only the threshold differs.

A p-norm over many tensors is ``root(Σ_i Σ|g_i|^p)`` (``max_i max|g_i|`` for p = inf). Power sums are
what add up across tensors, devices and ranks, so they are what this module works with; the kernels per
device and dtype are in :mod:`gradclip_algo.kernels`. Sums are accumulated in float32, or float64 as soon
as one tensor is float64, so that a float64 norm up to float64's range stays finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from gradclip_algo import kernels

GroupKey = tuple[torch.device, torch.dtype]


def group_by_device_and_dtype(tensors: list[Tensor]) -> dict[GroupKey, list[int]]:
    """Indices of ``tensors`` grouped by device and dtype, so that each group can go to one kernel."""
    if not tensors:
        return {}
    grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)
    by_key: dict[GroupKey, list[int]] = {}
    for key, (_, indices) in grouped.items():
        by_key[key] = indices
    return by_key


def sum_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32: the dtype of sums over all of them."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def combine(power_sums: Tensor, norm_type: float) -> Tensor:
    """Power sums of parts -> the power sum of the whole: their sum (their max for p = inf)."""
    if power_sums.numel() == 0:
        return power_sums.new_zeros(())
    return power_sums.max() if math.isinf(norm_type) else power_sums.sum()


def root(power_sum: Tensor, norm_type: float) -> Tensor:
    """The p-norm from a power sum: ``s^(1/p)`` (``s`` itself for p = inf)."""
    return power_sum if math.isinf(norm_type) else power_sum.pow(1.0 / norm_type)


def power_sums(tensors: list[Tensor], norm_type: float, device: torch.device | None = None) -> Tensor:
    """``[Σ|t_i|^p for each tensor]`` (``max|t_i|`` for inf) as a 1-D tensor on ``device`` (default: the
    first tensor's), in :func:`sum_dtype`; entry ``i`` belongs to ``tensors[i]``."""
    dtype = sum_dtype(tensors)
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    device = device if device is not None else tensors[0].device
    groups = group_by_device_and_dtype(tensors)
    if len(groups) == 1:
        return kernels.power_sums(tensors, norm_type).to(device, dtype)
    out = torch.empty(len(tensors), dtype=dtype, device=device)
    for indices in groups.values():
        sums = kernels.power_sums([tensors[i] for i in indices], norm_type)
        out[torch.tensor(indices, device=device)] = sums.to(device, dtype)
    return out


def power_sum(tensors: list[Tensor], norm_type: float, device: torch.device | None = None) -> Tensor:
    """``Σ_i Σ|t_i|^p`` (``max_i max|t_i|`` for inf), 0-d on ``device`` (default: the first tensor's), in
    :func:`sum_dtype`; 0 for no tensors."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    device = device if device is not None else tensors[0].device
    groups = group_by_device_and_dtype(tensors)
    if len(groups) == 1:
        return kernels.total_power_sum(tensors, norm_type).to(device)
    dtype = sum_dtype(tensors)
    sums = [
        kernels.total_power_sum([tensors[i] for i in indices], norm_type).to(device, dtype)
        for indices in groups.values()
    ]
    return combine(torch.stack(sums), norm_type)


def get_total_norm(
    tensors: list[Tensor], norm_type: float = 2.0, device: torch.device | None = None
) -> Tensor:
    """The p-norm of all ``tensors`` together, as if concatenated into one vector: 0-d, float32 (float64
    if one tensor is float64), on ``device`` (default: the first tensor's). As torch's ``get_total_norm``,
    but half-precision tensors are summed in float32. Local tensors only: for sharded grads the clipper
    reduces the power sums across ranks."""
    return root(power_sum(tensors, norm_type, device), norm_type)


NORM_EPS = 1e-6
"""Added to the norm in the coefficient's denominator, as in ``torch.nn.utils.clip_grad_norm_``."""


def clip_coefficient(total_norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """``min(1, τ / (‖G‖ + 1e-6))``: the factor that brings the norm ``‖G‖`` down to the threshold ``τ``.

    A factor of exactly 1 when ``‖G‖ + 1e-6 ≤ τ`` (always for ``τ = inf`` and a finite norm). As torch's,
    a NaN norm gives NaN and an infinite one 0 (NaN for ``τ = inf``).
    """
    return torch.clamp(max_norm / (total_norm + NORM_EPS), max=1.0)


def scale_grads_(grads: list[Tensor], coef: Tensor) -> None:
    """``g ← g · coef`` for every grad, in place; ``coef`` is a 0-d tensor on any device. No host sync."""
    for (device, _), indices in group_by_device_and_dtype(grads).items():
        group = grads if len(indices) == len(grads) else [grads[i] for i in indices]
        kernels.scale_(group, coef.to(device, non_blocking=True))


def clip_grads_with_norm_(grads: list[Tensor], max_norm: float | Tensor, total_norm: Tensor) -> Tensor:
    """Scale ``grads`` in place by :func:`clip_coefficient` of ``total_norm`` (computed by the caller, e.g.
    with :func:`~gradclip_algo.get_total_norm`) and ``max_norm``; returns the coefficient.

    The multiply always runs (a factor of 1 under the threshold), so nothing waits for the device.
    """
    coef = clip_coefficient(total_norm, max_norm)
    scale_grads_(grads, coef)
    return coef
