"""Clipping by value (Mikolov 2012, "Statistical language models based on neural networks")."""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.blocks import block_size, flat_blocks, packed_blocks
from gradclip_algo.distributed import Shards
from gradclip_algo.norms import group_by_device_and_dtype, sum_of_squares
from gradclip_algo.stats import ClipStats


def _count_nonzero_(block: Tensor) -> Tensor:
    """Non-zeros of ``block`` (overwritten with its signs); on CPU ``Σ sign²`` by BLAS is 2x count_nonzero."""
    if (
        block.device.type == "cpu"
        and block.dtype in (torch.float32, torch.float64)
        and block.numel() < 1 << 24
    ):
        return sum_of_squares(block.sign_())  # exact: the count is below 2^24
    return torch.count_nonzero(block)


def _split_by_size(
    grads: list[Tensor], device: torch.device, buffers: int
) -> tuple[int, list[Tensor], list[Tensor]]:
    """``(block size, large, small)``: the :func:`block_size` for ``grads`` (one device) and a rule holding
    ``buffers`` blocks, the grads of at least that many elements, and the rest."""
    numels = [g.numel() for g in grads]
    size = block_size(device, sum(numels), buffers)
    if max(numels) < size:  # the common case of many small grads: no second pass over them
        return size, [], grads
    large = [g for g, n in zip(grads, numels, strict=True) if n >= size]
    return size, large, [g for g, n in zip(grads, numels, strict=True) if n < size]


def _clamp_small_(grads: list[Tensor], clip_value: float) -> None:
    """Clamp many small grads (one device and dtype) by one foreach kernel pair."""
    if grads:
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)


def clamp_grads(shards: Shards, clip_value: float) -> None:
    """Clamp every grad to ``[-λ, λ]`` in place and nothing else: one pass over large grads, one foreach
    kernel pair over each device and dtype group of small ones."""
    grads = shards.grads
    groups = group_by_device_and_dtype(grads)
    for (device, _), indices in groups.items():
        _, large, small = _split_by_size(
            grads if len(groups) == 1 else [grads[i] for i in indices], device, 1
        )
        for grad in large:
            grad.clamp_(-clip_value, clip_value)
        _clamp_small_(small, clip_value)


def _clamp_with_stats(grads: list[Tensor], clip_value: float, device: torch.device) -> Tensor:
    """Clamp ``grads`` in place; return ``[Σg² before, #clipped, Σg² after, #elements]`` (fp32, on ``device``).

    Each cache-sized block is read from memory once: its norm, the count of elements beyond ±λ (the
    non-zeros of softshrink) and the clamp all run on the block while it is in cache. Large grads are
    cut into blocks clamped where they are; small ones are measured on packed copies, then clamped by
    one foreach kernel pair (cheaper than writing thousands of copies back).
    """
    before, clipped, after = [], [], []
    size, large, small = _split_by_size(grads, grads[0].device, buffers=2)  # a pack and the scratch
    scratch = torch.empty(size, dtype=grads[0].dtype, device=grads[0].device)

    def measure_and_clamp_(block: Tensor) -> None:
        before.append(sum_of_squares(block))
        # a strided grad comes whole (it cannot be cut into flat views) and may exceed the scratch buffer
        out = scratch[: block.numel()].view(block.shape) if block.numel() <= size else torch.empty_like(block)
        shrunk = torch.ops.aten.softshrink.out(block, clip_value, out=out)
        clipped.append(_count_nonzero_(shrunk))
        block.clamp_(-clip_value, clip_value)
        after.append(sum_of_squares(block))

    for grad in large:
        for block in flat_blocks(grad, size):
            measure_and_clamp_(block)
    for _, block in packed_blocks(small, size):
        measure_and_clamp_(block.view(-1))
    _clamp_small_(small, clip_value)
    sums = [torch.stack(values).to(device, torch.float32).sum() for values in (before, clipped, after)]
    return torch.stack([*sums, torch.full((), float(sum(g.numel() for g in grads)), device=device)])


def clip_grad_value(shards: Shards, clip_value: float) -> ClipStats:
    """Clamp every grad element to ``[-λ, λ]``, in place; an elementwise clamp on every layout.

    Statistics: L2 norms before and after, and the share of elements with ``|g| > λ``.
    """
    device = shards.device
    parts, partial = [], []
    for is_split in sorted(set(shards.reduction)):
        chosen = [g for g, split in zip(shards.grads, shards.reduction, strict=True) if split == is_split]
        for indices in group_by_device_and_dtype(chosen).values():
            parts.append(_clamp_with_stats([chosen[i] for i in indices], clip_value, device))
            partial.append(is_split)
    stacked = torch.stack(parts) if parts else torch.zeros(0, 4, device=device)
    before, clipped, after, numel = (shards.total(column, partial=partial) for column in stacked.unbind(1))
    return ClipStats(
        grad_norm=before.sqrt(),
        clipped_grad_norm=after.sqrt(),
        clipped_fraction=clipped / numel.clamp(min=1),
    )
