"""Walk many grads in cache-sized flat blocks, so several cheap ops cost about one trip through memory.

Large contiguous grads are cut into views of at most :func:`block_size` elements; small ones are packed together
into one reusable buffer (written back after the block is processed), so that thousands of tiny tensors
cost a few large ops instead of thousands of small ones. Extra memory: one buffer of a block, at most
1/256 of the grads' size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

CPU_BLOCK = 1 << 18  # 1 MiB of fp32: stays in a core's L2 cache while a few ops run over it
ACCELERATOR_BLOCK = 1 << 24  # on a GPU, launches cost more than memory traffic: few, large blocks


MIN_BLOCK = 1 << 12
MEMORY_SHARE = 256  # a buffer is at most 1/256 of the grads: a rule's one or two buffers stay under 1 %


def block_size(device: torch.device, total_numel: int) -> int:
    """Elements per block on ``device`` for grads of ``total_numel`` elements in all."""
    base = CPU_BLOCK if device.type == "cpu" else ACCELERATOR_BLOCK
    return min(base, max(MIN_BLOCK, total_numel // MEMORY_SHARE))


def _packs(tensors: list[Tensor], block: int) -> Iterator[list[Tensor]]:
    """Consecutive runs of small tensors whose total size fits in one block."""
    pack: list[Tensor] = []
    size = 0
    for tensor in tensors:
        if pack and size + tensor.numel() > block:
            yield pack
            pack, size = [], 0
        pack.append(tensor)
        size += tensor.numel()
    if pack:
        yield pack


def for_each_block(tensors: list[Tensor], process: Callable[[Tensor], None]) -> None:
    """Call ``process(block)`` on flat blocks covering every element of ``tensors`` exactly once.

    ``process`` may change its block in place; the changes reach the tensors. All tensors must share one
    device and dtype.
    """
    if not tensors:
        return
    size = block_size(tensors[0].device, sum(t.numel() for t in tensors))
    small = []
    for tensor in tensors:
        if tensor.numel() < size and tensor.is_contiguous():
            small.append(tensor)
        elif tensor.is_contiguous():
            for block in tensor.view(-1).split(size):
                process(block)
        else:  # a strided view cannot be flattened without a copy: process it whole
            process(tensor)
    if not small:
        return
    numel = min(size, sum(t.numel() for t in small))
    buffer = torch.empty(numel, dtype=small[0].dtype, device=small[0].device)
    for pack in _packs(small, size):
        flats = [t.view(-1) for t in pack]
        block = torch.cat(flats, out=buffer[: sum(f.numel() for f in flats)])
        process(block)
        torch._foreach_copy_(flats, block.split([f.numel() for f in flats]))
