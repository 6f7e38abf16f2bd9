"""Adaptive gradient clipping, AGC (Brock, De, Smith and Simonyan 2021, arXiv 2102.06171)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from gradclip_algo.blocks import block_size
from gradclip_algo.distributed import Shards
from gradclip_algo.norms import unit_ndim, unit_norms
from gradclip_algo.stats import ClipStats

AGC_EPS = 1e-3  # the paper's floor on the weight norm

UnitStats = tuple[Tensor, bool]  # [Σ‖G_u‖², Σ‖G_u·c_u‖², #clipped, #units] in fp32; this rank's share?


def agc_coefficients(grad_norms: Tensor, weight_norms: Tensor, clipping: float, eps: float) -> Tensor:
    """``min(1, M_u / ‖G_u‖)`` with ``M_u = λ · max(‖W_u‖, ε)``: the paper's "if ‖G_u‖ > M_u" as a factor.

    ``M_u > 0``, so a zero grad norm gives ``inf``, clamped to 1: no division guard is needed.
    """
    return (weight_norms.clamp(min=eps) * clipping / grad_norms).clamp_(max=1.0)


def _unit_stats(grad_norms: Tensor, coef: Tensor) -> Tensor:
    """``[Σ‖G_u‖², Σ(c_u‖G_u‖)², #units clipped, #units]`` (fp32): summed at once, so no per-unit vector
    outlives its tensor."""
    grad_norms, coef = grad_norms.to(torch.float32), coef.to(torch.float32)
    return torch.stack(
        [
            grad_norms.square().sum(),
            (grad_norms * coef).square().sum(),
            (coef < 1.0).sum(dtype=torch.float32),
            torch.full((), float(coef.numel()), device=coef.device),
        ]
    )


def _clip_units_(grad: Tensor, weight: Tensor, ndim: int, clipping: float, eps: float) -> Tensor:
    """Clip ``grad`` unit by unit (units = its last ``ndim`` dims); return its :func:`_unit_stats`."""
    grad_norms = unit_norms(grad, ndim)
    coef = agc_coefficients(grad_norms, unit_norms(weight, ndim), clipping, eps)
    grad.mul_(coef)
    return _unit_stats(grad_norms, coef)


def _clip_stacked_(grads: list[Tensor], weights: list[Tensor], clipping: float, eps: float) -> Tensor:
    """Clip small tensors of one shape with a few ops on their stack, then write the grads back."""
    stack = torch.stack(grads)
    result = _clip_units_(stack, torch.stack(weights), unit_ndim(grads[0]), clipping, eps)
    torch._foreach_copy_(grads, stack.unbind(0))
    return result


def _clip_spread_(shards: Shards, indices: list[int], clipping: float, eps: float) -> list[UnitStats]:
    """Clip 0-D/1-D tensors sharded over ranks (one unit each); their norms are all-reduced in one call."""
    local = [t for i in indices for t in (shards.grads[i], shards.params[i])]
    squares = torch.stack([unit_norms(t).square().to(shards.device, torch.float32) for t in local])
    norms = shards.sum_over_ranks_(squares).sqrt().view(-1, 2)
    results = []
    for i, (grad_norm, weight_norm) in zip(indices, norms, strict=True):
        coef = agc_coefficients(grad_norm, weight_norm, clipping, eps)
        shards.grads[i].mul_(coef.to(shards.grads[i].device))
        results.append((_unit_stats(grad_norm.view(1), coef.view(1)), False))
    return results


def adaptive_clip_grad(shards: Shards, clipping: float, eps: float = AGC_EPS) -> ClipStats:
    """Per unit u: ``M_u = λ · max(‖W_u‖, ε)``; if ``‖G_u‖ > M_u`` then ``G_u ← G_u · M_u / ‖G_u‖``.

    Units are output rows/filters for tensors of 2+ dims and the whole tensor for 0-D and 1-D ones.
    The floor ε keeps zero-initialised parameters trainable. Norms are L2 and computed in fp32.
    Small tensors of one shape are clipped together on their stack, a block at a time.
    """
    if shards.layout == "fsdp1":  # refused on every rank alike, also one that holds no grads
        raise ValueError(
            "clipping_type='adaptive' under FSDP1: its flat shards split AGC's units (rows, filters) "
            "across ranks; use FSDP2 (fully_shard), which keeps each unit on one rank, or DDP"
        )
    spread = [i for i, whole in enumerate(shards.units_whole) if not whole]
    results = _clip_spread_(shards, spread, clipping, eps) if spread else []
    size = block_size(shards.device, sum(g.numel() for g in shards.grads))
    stackable: dict[tuple, list[int]] = defaultdict(list)
    for i, (grad, weight) in enumerate(zip(shards.grads, shards.params, strict=True)):
        if not shards.units_whole[i]:
            continue
        if grad.numel() * 4 < size:
            stackable[(grad.shape, grad.dtype, grad.device, shards.split[i])].append(i)
        else:
            results.append((_clip_units_(grad, weight, unit_ndim(grad), clipping, eps), shards.split[i]))
    for (shape, _, _, split), indices in stackable.items():
        per_block = max(1, size // max(1, shape.numel()))
        for start in range(0, len(indices), per_block):
            chunk = indices[start : start + per_block]
            grads, weights = [shards.grads[i] for i in chunk], [shards.params[i] for i in chunk]
            results.append((_clip_stacked_(grads, weights, clipping, eps), split))
    return _agc_stats(shards, results)


def _agc_stats(shards: Shards, results: list[UnitStats]) -> ClipStats:
    """Global pre/post L2 norms and the share of clipped units, from each part's unit statistics."""
    device = shards.device
    rows = [stats.to(device) for stats, _ in results]
    stacked = torch.stack(rows) if rows else torch.zeros(0, 4, device=device)
    partial = [split for _, split in results]
    before, after, clipped, units = (shards.total(column, partial=partial) for column in stacked.unbind(1))
    return ClipStats(before.sqrt(), after.sqrt(), clipped / units.clamp(min=1))
