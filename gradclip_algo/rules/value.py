"""Clipping by value (Mikolov 2012, "Statistical language models based on neural networks")."""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.blocks import block_size, for_each_block
from gradclip_algo.distributed import Shards
from gradclip_algo.norms import group_by_device_and_dtype, sum_of_squares
from gradclip_algo.stats import ClipStats


def _count_nonzero_(block: Tensor) -> Tensor:
    """Non-zeros of ``block`` (overwritten with its signs); on CPU ``Σ sign²`` by BLAS is 2x count_nonzero."""
    if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
        return sum_of_squares(block.sign_())  # exact: a block's count is far below 2^24
    return torch.count_nonzero(block)


def clamp_grads(shards: Shards, clip_value: float) -> None:
    """Clamp every grad to ``[-λ, λ]`` in place and nothing else: one pass over large grads, one foreach
    kernel pair over each device and dtype group of small ones."""
    grads = shards.grads
    for (device, _), indices in group_by_device_and_dtype(grads).items():
        size = block_size(device, sum(grads[i].numel() for i in indices))
        small = [grads[i] for i in indices if grads[i].numel() < size]
        for i in indices:
            if grads[i].numel() >= size:
                grads[i].clamp_(-clip_value, clip_value)
        if small:
            torch._foreach_clamp_min_(small, -clip_value)
            torch._foreach_clamp_max_(small, clip_value)


def _clamp_with_stats(grads: list[Tensor], clip_value: float, device: torch.device) -> Tensor:
    """Clamp ``grads`` in place; return ``[Σg² before, #clipped, Σg² after, #elements]`` (fp32, on ``device``).

    Each cache-sized block is read from memory once: its norm, the count of elements beyond ±λ
    (the non-zeros of softshrink) and the clamp all run on the block while it is in cache.
    """
    before, clipped, after = [], [], []
    size = block_size(grads[0].device, sum(g.numel() for g in grads))
    scratch = torch.empty(size, dtype=grads[0].dtype, device=grads[0].device)

    def process(block: Tensor) -> None:
        before.append(sum_of_squares(block))
        # a strided grad comes whole (it cannot be cut into flat views) and may exceed the scratch buffer
        out = scratch[: block.numel()].view(block.shape) if block.numel() <= size else torch.empty_like(block)
        shrunk = torch.ops.aten.softshrink.out(block, clip_value, out=out)
        clipped.append(_count_nonzero_(shrunk))
        block.clamp_(-clip_value, clip_value)
        after.append(sum_of_squares(block))

    for_each_block(grads, process)
    sums = [torch.stack(values).to(device, torch.float32).sum() for values in (before, clipped, after)]
    return torch.stack([*sums, torch.full((), float(sum(g.numel() for g in grads)), device=device)])


def clip_grad_value(shards: Shards, clip_value: float) -> ClipStats:
    """Clamp every grad element to ``[-λ, λ]``, in place; an elementwise clamp on every layout.

    Statistics: L2 norms before and after, and the share of elements with ``|g| > λ``.
    """
    device = shards.device
    parts, partial = [], []
    for is_split in (True, False):
        chosen = [g for g, split in zip(shards.grads, shards.split, strict=True) if split == is_split]
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
