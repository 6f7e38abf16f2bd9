"""Walk many grads in cache-sized flat blocks, so several cheap ops cost about one trip through memory.

Large contiguous grads are cut into views of at most :func:`block_size` elements; small ones are copied,
a pack at a time, into one reusable buffer, so that thousands of tiny tensors cost a few large ops instead
of thousands of small ones. Extra memory: the buffers a rule holds at once, together at most 1/128 of the
grads' elements.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import Tensor

CPU_BLOCK = 1 << 18  # 1 MiB of fp32: stays in a core's L2 cache while a few ops run over it
ACCELERATOR_BLOCK = 1 << 24  # on a GPU, launches cost more than memory traffic: few, large blocks
CPU_REUSE_BLOCK = 1 << 22  # 16 MiB of fp32: a block read, then rewritten, is still in a shared L3 cache


MIN_BLOCK = 1 << 12
MEMORY_SHARE = 128  # a rule's buffers together hold at most 1/128 of the grads' elements: under 1 %


def block_size(device: torch.device, total_numel: int, buffers: float = 1) -> int:
    """Elements per block on ``device`` for grads of ``total_numel`` elements in all, for a rule that holds
    ``buffers`` blocks at once (or gives the block ``1/buffers`` of its memory)."""
    base = CPU_BLOCK if device.type == "cpu" else ACCELERATOR_BLOCK
    return min(base, max(MIN_BLOCK, int(total_numel / (MEMORY_SHARE * buffers))))


def reuse_block_size(device: torch.device) -> int:
    """Elements of a grad block (a view: no memory) that a rule reads and then rewrites while the block
    is still in cache, so that the rewrite costs no second trip to memory."""
    return CPU_REUSE_BLOCK if device.type == "cpu" else ACCELERATOR_BLOCK


def _packs(tensors: list[Tensor], block: int) -> Iterator[tuple[list[Tensor], int]]:
    """``(pack, numel)``: runs of tensors of one shape (1-D ones of any length; 0-d ones as 1-D), each
    within ``block`` elements. Such tensors concatenate along dim 0 with no per-tensor view, and a shape's
    runs are cut without per-tensor sizes."""
    by_shape: dict[torch.Size | None, list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_shape[tensor.shape if tensor.ndim > 1 else None].append(tensor)
    for shape, group in by_shape.items():
        if shape is not None:
            per_pack = max(1, block // max(1, shape.numel()))
            for start in range(0, len(group), per_pack):
                pack = group[start : start + per_pack]
                yield pack, len(pack) * shape.numel()
            continue
        pack, size = [], 0
        for tensor in group:
            numel = tensor.numel()
            if pack and size + numel > block:
                yield pack, size
                pack, size = [], 0
            pack.append(tensor if tensor.ndim else tensor.view(1))
            size += numel
        if pack:
            yield pack, size


def packed_blocks(tensors: list[Tensor], size: int) -> Iterator[tuple[list[Tensor], Tensor]]:
    """``(pack, block)`` per run of small ``tensors`` that fits in ``size`` elements: ``block`` holds their
    concatenation along dim 0 in one reused buffer (valid until the next iteration); ``block.view(-1)``
    is flat. A block is a copy: changing it leaves the tensors as they are."""
    if not tensors:
        return
    first = tensors[0]
    buffer = torch.empty(min(size, sum(t.numel() for t in tensors)), dtype=first.dtype, device=first.device)
    for pack, numel in _packs(tensors, size):
        yield pack, torch.cat(pack, out=buffer[:numel].view(-1, *pack[0].shape[1:]))


def flat_blocks(tensor: Tensor, size: int) -> list[Tensor]:
    """Views covering ``tensor``: flat blocks of at most ``size`` elements, or the tensor whole if it is
    strided (it cannot be flattened without a copy)."""
    return list(tensor.view(-1).split(size)) if tensor.is_contiguous() else [tensor]
