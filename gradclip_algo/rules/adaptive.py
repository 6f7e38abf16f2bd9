"""Adaptive gradient clipping, AGC (Brock, De, Smith and Simonyan 2021, arXiv 2102.06171)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from gradclip_algo.blocks import block_size, reuse_block_size
from gradclip_algo.distributed import Shards
from gradclip_algo.norms import group_by_device_and_dtype, unit_ndim, unit_norms
from gradclip_algo.stats import ClipStats

AGC_EPS = 1e-3  # the paper's floor on the weight norm

UnitStats = tuple[Tensor, int]  # [Σ‖G_u‖², Σ‖G_u·c_u‖², #clipped, #units] in fp32; Shards reduction id


def agc_coefficients(grad_norms: Tensor, weight_norms: Tensor, clipping: float, eps: float) -> Tensor:
    """``min(1, M_u / ‖G_u‖)`` with ``M_u = λ · max(‖W_u‖, ε)``: the paper's "if ‖G_u‖ > M_u" as a factor.

    ``M_u > 0``, so a zero grad norm gives ``inf``, clamped to 1: no division guard is needed.
    """
    return weight_norms.clamp(min=eps).mul_(clipping).div_(grad_norms).clamp_(max=1.0)


def _unit_stats(grad_norms: Tensor, coef: Tensor) -> Tensor:
    """``[Σ‖G_u‖², Σ(c_u‖G_u‖)², #units clipped, #units]`` (fp32) of one part; overwrites ``coef``."""
    grad_norms, coef = grad_norms.to(torch.float32).view(-1), coef.to(torch.float32).view(-1)
    clipped_norms = grad_norms * coef
    return torch.stack(
        [
            torch.dot(grad_norms, grad_norms),
            torch.dot(clipped_norms, clipped_norms),
            torch.count_nonzero(coef.sub_(1.0)).to(torch.float32),  # coef <= 1: coef - 1 < 0 if clipped
            torch.full((), float(coef.numel()), device=coef.device),
        ]
    )


class _UnitStatsSum:
    """The :func:`_unit_stats` of many parts (tensors, row blocks, stacks of small tensors), summed.

    Each part's ``(‖G_u‖, c_u)`` is held until the held parts have ``limit`` units, then they are reduced
    together: a dozen tiny ops per batch of parts instead of per part, in memory bounded by ``limit``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: list[tuple[Tensor, Tensor]] = []
        self.units = 0
        self.reduced: list[Tensor] = []

    def add(self, grad_norms: Tensor, coef: Tensor) -> None:
        self.held.append((grad_norms.view(-1), coef.view(-1)))
        self.units += coef.numel()
        if self.units >= self.limit:
            self._reduce()

    def _reduce(self) -> None:
        norms, coefs = (torch.cat(parts) for parts in zip(*self.held, strict=True))
        self.held, self.units = [], 0  # frees the parts before the statistics' temporaries are made
        self.reduced.append(_unit_stats(norms, coefs))

    def total(self) -> Tensor | None:
        """The summed statistics, or ``None`` if no part was added."""
        if self.held:
            self._reduce()
        return torch.stack(self.reduced).sum(0) if self.reduced else None


def _clip_units_(
    grad: Tensor, weight: Tensor, ndim: int, clipping: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Clip ``grad`` unit by unit (units = its last ``ndim`` dims); return ``(‖G_u‖, c_u)``.

    The weight norms come first, so that the grad is still in cache when it is multiplied.
    """
    weight_norms = unit_norms(weight, ndim)
    grad_norms = unit_norms(grad, ndim)
    coef = agc_coefficients(grad_norms, weight_norms, clipping, eps)
    grad.mul_(coef)
    return grad_norms, coef


def _clip_large_(
    grad: Tensor, weight: Tensor, clipping: float, eps: float, block: int, stats: _UnitStatsSum
) -> None:
    """Clip one large tensor, a block of whole units (rows, filters) of at most ``block`` elements at a
    time: each block of the grad is read from memory once, its multiply then runs in cache."""
    ndim = unit_ndim(grad)
    blocks = -(-grad.numel() // block)  # as few as fit, of equal size
    if grad.ndim < 2 or blocks == 1:  # one unit, or one block
        stats.add(*_clip_units_(grad, weight, ndim, clipping, eps))
        return
    rows = -(-grad.shape[0] // blocks)
    for grad_rows, weight_rows in zip(grad.split(rows), weight.split(rows), strict=True):
        stats.add(*_clip_units_(grad_rows, weight_rows, ndim, clipping, eps))


def _clip_stacked_(
    grads: list[Tensor], weights: list[Tensor], clipping: float, eps: float, stack: Tensor
) -> tuple[Tensor, Tensor]:
    """Clip small tensors of one shape with a few ops on their stack: the unit norms of the stacked
    weights, then of the stacked grads in the same buffer ``stack`` (shaped ``[len(grads), *shape]``); the
    grads are scaled on the stack and copied back. Returns ``(‖G_u‖, c_u)``, each shaped
    ``[len(grads), unit dims kept as 1]``."""
    ndim = unit_ndim(grads[0])
    weight_norms = unit_norms(torch.stack(weights, out=stack), ndim)
    grad_norms = unit_norms(torch.stack(grads, out=stack), ndim)
    coef = agc_coefficients(grad_norms, weight_norms, clipping, eps)
    torch.unbind_copy(stack.mul_(coef), 0, out=grads)
    return grad_norms, coef


def _clip_same_shape_(
    grads: list[Tensor],
    weights: list[Tensor],
    clipping: float,
    eps: float,
    buffer: Tensor,
    stats: _UnitStatsSum,
) -> None:
    """Clip many small tensors of one shape, as many at a time as ``buffer`` holds (:func:`_clip_stacked_`)."""
    per_stack = min(len(grads), max(1, buffer.numel() // max(1, grads[0].numel())))
    stack = buffer[: per_stack * grads[0].numel()].view(per_stack, *grads[0].shape)
    for start in range(0, len(grads), per_stack):
        chunk = slice(start, start + per_stack)
        count = min(per_stack, len(grads) - start)
        part = stack if count == per_stack else stack[:count]
        stats.add(*_clip_stacked_(grads[chunk], weights[chunk], clipping, eps, part))


def _clip_spread_(shards: Shards, indices: list[int], clipping: float, eps: float) -> list[UnitStats]:
    """Clip tensors whose units are split across ranks (sharded 0-D/1-D tensors, column-sharded weights):
    their local unit sums of squares are summed over the ranks that split them, all in one call."""
    local = [t for i in indices for t in (shards.grads[i], shards.params[i])]
    squares = [unit_norms(t).to(shards.device, torch.float32).square() for t in local]
    norms = [s.sqrt_() for s in shards.unit_totals_([i for i in indices for _ in (0, 1)], squares)]
    results = []
    for k, i in enumerate(indices):
        grad_norm, weight_norm = norms[2 * k], norms[2 * k + 1]
        coef = agc_coefficients(grad_norm, weight_norm, clipping, eps)
        shards.grads[i].mul_(coef.to(shards.grads[i].device))
        results.append((_unit_stats(grad_norm, coef), shards.unit_reduction[i]))
    return results


def adaptive_clip_grad(shards: Shards, clipping: float, eps: float = AGC_EPS) -> ClipStats:
    """Per unit u: ``M_u = λ · max(‖W_u‖, ε)``; if ``‖G_u‖ > M_u`` then ``G_u ← G_u · M_u / ‖G_u‖``.

    Units are output rows/filters for tensors of 2+ dims and the whole tensor for 0-D and 1-D ones.
    The floor ε keeps zero-initialised parameters trainable. Norms are L2 and computed in fp32.
    A large tensor is clipped a cache-sized block of whole units at a time (its weights' norms, its grads'
    norms, then the multiply, while the grads are still in cache); small tensors of one shape are clipped
    together on their stack.
    """
    if shards.layout == "fsdp1":  # refused on every rank alike, also one that holds no grads
        raise ValueError(
            "clipping_type='adaptive' under FSDP1: its flat shards split AGC's units (rows, filters) "
            "across ranks; use FSDP2 (fully_shard), which keeps each unit on one rank, or DDP"
        )
    spread = [i for i, whole in enumerate(shards.units_whole) if not whole]
    results = _clip_spread_(shards, spread, clipping, eps) if spread else []
    grads, weights, split, whole = shards.grads, shards.params, shards.reduction, shards.units_whole
    shapes = [grad.shape for grad in grads]
    numel = sum(shape.numel() for shape in shapes)
    # two thirds of the memory for stacking small tensors, one third for the per-unit statistics held
    # (a norm and a factor per unit, and their concatenation when they are summed: 4 values per unit)
    size = block_size(shards.device, numel, buffers=1.5)
    held_units = block_size(shards.device, numel, buffers=3) // 4
    for (device, dtype), group in group_by_device_and_dtype(grads).items():
        stats = {way: _UnitStatsSum(held_units) for way in set(split)}
        block = reuse_block_size(device)
        stackable: dict[tuple, list[int]] = defaultdict(list)
        for i in group:
            if whole[i] and shapes[i].numel() * 4 < size:
                stackable[(shapes[i], split[i])].append(i)
            elif whole[i]:
                _clip_large_(grads[i], weights[i], clipping, eps, block, stats[split[i]])
        buffer = torch.empty(size if stackable else 0, dtype=dtype, device=device)
        for (_, is_split), indices in stackable.items():
            same_shape = [grads[i] for i in indices], [weights[i] for i in indices]
            _clip_same_shape_(*same_shape, clipping, eps, buffer, stats[is_split])
        results += [
            (summed, is_split) for is_split, part in stats.items() if (summed := part.total()) is not None
        ]
    return _agc_stats(shards, results)


def _agc_stats(shards: Shards, results: list[UnitStats]) -> ClipStats:
    """Global pre/post L2 norms and the share of clipped units, from each part's unit statistics."""
    device = shards.device
    rows = [stats.to(device) for stats, _ in results]
    stacked = torch.stack(rows) if rows else torch.zeros(0, 4, device=device)
    partial = [split for _, split in results]
    before, after, clipped, units = (shards.total(column, partial=partial) for column in stacked.unbind(1))
    return ClipStats(before.sqrt(), after.sqrt(), clipped / units.clamp(min=1))
