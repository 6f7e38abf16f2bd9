"""Adaptive gradient clipping, AGC (Brock, De, Smith and Simonyan 2021, arXiv 2102.06171)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.distributed import Shards
from gradclip_algo.norms import unit_norms
from gradclip_algo.stats import ClipStats

AGC_EPS = 1e-3  # the paper's floor on the weight norm


def _whole_unit_norms(shards: Shards) -> tuple[list[Tensor], list[Tensor]]:
    """Unit norms of grads and weights; units spread over ranks (sharded 0-D/1-D tensors) all-reduced."""
    grad_norms = [unit_norms(g) for g in shards.grads]
    weight_norms = [unit_norms(w) for w in shards.params]
    spread = [i for i, whole in enumerate(shards.units_whole) if not whole]
    if spread:
        if shards.layout == "fsdp1":
            raise ValueError(
                "clipping_type='adaptive' under FSDP1: its flat shards split AGC's units (rows, filters) "
                "across ranks; use FSDP2 (fully_shard), which keeps each unit on one rank, or DDP"
            )
        squares = shards.sum_over_ranks_(
            torch.stack([n.square() for i in spread for n in (grad_norms[i], weight_norms[i])])
        )
        for k, i in enumerate(spread):
            grad_norms[i], weight_norms[i] = squares[2 * k].sqrt(), squares[2 * k + 1].sqrt()
    return grad_norms, weight_norms


def adaptive_clip_grad(shards: Shards, clipping: float, eps: float = AGC_EPS) -> ClipStats:
    """Per unit u: ``M_u = λ · max(‖W_u‖, ε)``; if ``‖G_u‖ > M_u`` then ``G_u ← G_u · M_u / ‖G_u‖``.

    Units are output rows/filters for tensors of 2+ dims and the whole tensor for 0-D and 1-D ones.
    The floor ε keeps zero-initialised parameters trainable. Norms are L2 and computed in fp32.
    """
    device = shards.device
    grad_norms, weight_norms = _whole_unit_norms(shards)
    before, after, clipped, units = [], [], [], []
    for grad, grad_norm, weight_norm in zip(shards.grads, grad_norms, weight_norms, strict=True):
        max_norm = clipping * weight_norm.clamp(min=eps)
        clip = grad_norm > max_norm
        grad.mul_(torch.where(clip, max_norm / grad_norm, 1.0))
        before.append(grad_norm.square().sum())
        after.append(torch.minimum(grad_norm, max_norm).square().sum())
        clipped.append(clip.sum())
        units.append(grad_norm.numel())
    # per-tensor stats of units that lie on this rank are partial; all-reduced unit norms are whole
    partial = [s and w for s, w in zip(shards.split, shards.units_whole, strict=True)]

    def total(values: list[Tensor]) -> Tensor:
        return shards.total(torch.stack(values).to(device, torch.float32), partial=partial)

    unit_count = torch.tensor(units, dtype=torch.float32).to(device, non_blocking=True)
    return ClipStats(
        grad_norm=total(before).sqrt(),
        clipped_grad_norm=total(after).sqrt(),
        clipped_fraction=total(clipped) / shards.total(unit_count, partial=partial).clamp(min=1),
    )
