"""Adaptive gradient clipping, AGC (Brock, De, Smith and Simonyan 2021, arXiv 2102.06171)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gradclip_algo import kernels
from gradclip_algo.distributed import Shards
from gradclip_algo.norms import group_by_device_and_dtype, sum_dtype
from gradclip_algo.options import RuleOptions, option
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_positive_number

AGC_EPS = 1e-3  # the paper's floor on the weight norm


@dataclass(frozen=True)
class AdaptiveOptions(RuleOptions):
    """``eps``: the floor ε on each unit's weight norm (default 1e-3, the paper's)."""

    eps: float = option(AGC_EPS, check_positive_number)


def agc_coefficients(grad_norms: Tensor, weight_norms: Tensor, clipping: float, eps: float) -> Tensor:
    """``min(1, M_u / ‖G_u‖)`` with ``M_u = λ · max(‖W_u‖, ε)``: the paper's "if ‖G_u‖ > M_u" as a factor.

    ``M_u > 0``, so a zero grad norm gives ``inf``, clamped to 1: no division guard is needed.
    """
    return weight_norms.clamp(min=eps).mul_(clipping).div_(grad_norms).clamp_(max=1.0)


def adaptive_clip(shards: Shards, clipping: float, options: AdaptiveOptions) -> ClipStats:
    """Per unit u: ``M_u = λ · max(‖W_u‖, ε)``; if ``‖G_u‖ > M_u`` then ``G_u ← G_u · M_u / ‖G_u‖``.

    Units are output rows/filters for tensors of 2+ dims and the whole tensor for 0-D and 1-D ones
    (:func:`~gradclip_algo.kernels.unit_norms`). The floor ε keeps zero-initialised parameters trainable.
    Norms are L2, accumulated in float32 (float64 for float64). Statistics: the global L2 norms before and
    after, and the share of units clipped.
    """
    if shards.layout == "fsdp1":  # refused on every rank alike, also one that holds no grads
        raise ValueError(
            "clipping_type='adaptive' under FSDP1: its flat shards split AGC's units (rows, filters) "
            "across ranks; use FSDP2 (fully_shard), which keeps each unit on one rank, or DDP"
        )
    coefficient = partial(agc_coefficients, clipping=clipping, eps=options.eps)
    whole = [i for i, units_whole in enumerate(shards.units_whole) if units_whole]
    dtype = sum_dtype(shards.grads)
    # unit statistics [Σ‖G_u‖², Σ(c_u‖G_u‖)², units clipped, units] summed per way the tensors are split
    # (Shards.reduction; 0: whole on this rank)
    sums: dict[int, list[Tensor]] = {way: [] for way in {*shards.reduction, *shards.unit_reduction}}
    spread = [i for i, units_whole in enumerate(shards.units_whole) if not units_whole]
    if spread:
        for i, part in zip(spread, _clip_spread_units_(shards, spread, coefficient, dtype), strict=True):
            sums[shards.unit_reduction[i]].append(part)
    for indices in group_by_device_and_dtype([shards.grads[i] for i in whole]).values():
        chosen = [whole[j] for j in indices]
        for way in sorted({shards.reduction[i] for i in chosen}):
            part = [i for i in chosen if shards.reduction[i] == way]
            grads, weights = [shards.grads[i] for i in part], [shards.params[i] for i in part]
            unit_sums, units = kernels.scale_units_(grads, weights, coefficient)
            sums[way].append(_with_units(unit_sums, units, shards.device, dtype))
    ways = sorted(sums)
    local = (
        torch.stack([_total(sums[way], shards.device, dtype) for way in ways])
        if ways
        else torch.zeros(0, 4, dtype=dtype, device=shards.device)
    )
    before, after, clipped, units = shards.total(local, partial=ways).unbind()
    return ClipStats(before.sqrt(), after.sqrt(), clipped / units.clamp(min=1))


def _with_units(unit_sums: Tensor, units: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[Σ‖G_u‖², Σ(c_u‖G_u‖)², units clipped, units]`` in ``dtype`` on ``device``."""
    count = torch.full((1,), float(units), dtype=dtype, device=device)
    return torch.cat([unit_sums.to(device, dtype), count])


def _total(parts: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.stack(parts).sum(0) if parts else torch.zeros(4, dtype=dtype, device=device)


def _clip_spread_units_(
    shards: Shards, indices: list[int], coefficient: kernels.UnitCoefficient, dtype: torch.dtype
) -> list[Tensor]:
    """Clip the tensors whose units are split across ranks (sharded 0-D/1-D tensors, column-sharded
    weights): their local unit sums of squares are summed over those ranks, all in one call; returns the
    unit statistics per tensor (see :func:`_with_units`)."""
    squares = [
        kernels.unit_norms(t).to(shards.device, torch.float32).square()
        for i in indices
        for t in (shards.grads[i], shards.params[i])
    ]
    norms = [s.sqrt_() for s in shards.unit_totals_([i for i in indices for _ in (0, 1)], squares)]
    results = []
    for k, i in enumerate(indices):
        grad_norms, weight_norms = norms[2 * k], norms[2 * k + 1]
        coef = coefficient(grad_norms, weight_norms)
        shards.grads[i].mul_(coef.to(shards.grads[i].device, shards.grads[i].dtype))
        results.append(
            _with_units(kernels.unit_sums(grad_norms, coef), grad_norms.numel(), shards.device, dtype)
        )
    return results
