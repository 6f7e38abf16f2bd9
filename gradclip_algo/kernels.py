"""The primitives every rule is built from, with each device- or size-specific fast path behind them.

Each primitive takes tensors of one device and one dtype (callers group them; see
:func:`~gradclip_algo.norms.group_by_device_and_dtype`) and returns what a plain foreach loop would:

- :func:`power_sums`: per-tensor ``Σ|t|^p`` (``max|t|`` for p = inf);
- :func:`total_power_sum`: the same for all tensors together;
- :func:`scale_`: ``t ← t · c`` with one factor or one per tensor;
- :func:`clamp_`: ``t ← clamp(t, -λ, λ)``;
- :func:`clamp_with_stats_`: the same, with ``Σt²`` before and after and ``#{|t| > λ}`` of all tensors;
- :func:`clamp_with_peak_`: the same, with ``max|t|`` before;
- :func:`scale_units_`: ``G_u ← G_u · f(‖G_u‖, ‖W_u‖)`` per unit u (AGC).

Sums are accumulated in float32, or float64 for float64 tensors (as torch's norms are; the sums of squares
of a strided CPU block of :func:`clamp_with_stats_` in float64). The fast paths, each covered at and
around its size limits by the differential fuzz (``tests/test_fuzz.py``):

- CPU, p = 2, float32/float64: ``torch.dot(t, t)`` for tensors of at least :data:`CPU_DOT_MIN_NUMEL`
  elements; smaller ones are copied, a pack of at most :data:`PACK_NUMEL` elements at a time, into one
  buffer that goes to one dot. p = inf: ``torch.aminmax`` in place of the dot.
- CPU: one in-place ``clamp_`` for tensors of at least :data:`CPU_DOT_MIN_NUMEL` elements (torch's
  foreach pair makes two passes).
- Any device: :func:`clamp_with_stats_` runs a block at a time (on CPU of at most
  :data:`CLAMP_BLOCK_NUMEL` elements) through its norm, count, clamp and norm after, reading it from
  memory once (:func:`clamp_with_peak_` through its extremes and clamp); tensors under
  :data:`CPU_DOT_MIN_NUMEL` elements go through it packed, at most :data:`CLAMP_PACK_NUMEL` elements a
  pack; sums of squares by BLAS dot on CPU float32/float64 blocks, as for the norm.
- CPU: AGC on a tensor of more than :data:`CPU_REUSE_NUMEL` elements runs a block of whole rows at a
  time: its norms, then its multiply while it is still in cache.
- Any device: AGC on small tensors of one shape runs on their stack (:data:`STACK_NUMEL` elements at a
  time), a few ops per stack instead of a few per tensor.

Everything else is the foreach kernel torch uses. No primitive reads a tensor's value on the host.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

CPU_DOT_MIN_NUMEL = 1 << 14
"""From this size on, a CPU tensor gets its own dot (or aminmax, or clamp_) instead of a foreach kernel."""
PACK_NUMEL = 1 << 18
"""Elements of the buffer that small CPU tensors are packed into (1 MiB of float32: an L2 cache)."""
STACK_NUMEL = 1 << 20
"""Elements of the buffer that small same-shaped tensors are stacked in for AGC."""
CPU_REUSE_NUMEL = 1 << 22
"""AGC on CPU clips a larger tensor a block of whole rows of at most this many elements (16 MiB of
float32) at a time, so that the block is still in the L3 cache when it is multiplied after its norms."""
CLAMP_BLOCK_NUMEL = 1 << 20
"""On CPU, 'value' clipping that measures runs a larger tensor a block of at most this many elements
(4 MiB of float32) at a time: what it measures after the first read, and the clamp, read the block from
cache."""
CLAMP_PACK_NUMEL = 1 << 16
"""The same for tensors smaller than :data:`CPU_DOT_MIN_NUMEL`: they are packed, at most this many elements
(256 KiB of float32) at a time, into one buffer that is measured, clamped and copied back (the buffers stay
within 1/:data:`MEMORY_SHARE` of the elements)."""
CHUNK_NUMEL = 1 << 24
"""Elsewhere, at most this many elements are counted at once (float32 counts of them stay exact)."""
MEMORY_SHARE = 128
"""A buffer holds at most 1/128 of the elements of the tensors it serves (under 1 % extra memory)."""
SIZE_LIMITS = (
    CPU_DOT_MIN_NUMEL,
    PACK_NUMEL,
    CLAMP_BLOCK_NUMEL,
    CLAMP_PACK_NUMEL,
    STACK_NUMEL,
    CPU_REUSE_NUMEL,
    MEMORY_SHARE * CPU_DOT_MIN_NUMEL,
)
"""The sizes at which a fast path starts or a buffer fills: the fuzz draws tensors on and around them."""

UnitCoefficient = Callable[[Tensor, Tensor], Tensor]
"""``(‖G_u‖, ‖W_u‖) -> c_u``: the factor of each unit, from its grad and weight norms (same shapes)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, else float32: the dtype sums and norms are accumulated in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _buffer_numel(limit: int, total: int) -> int:
    """A buffer of at most ``limit`` elements and at most ``1/MEMORY_SHARE`` of ``total``."""
    return min(limit, total // MEMORY_SHARE)


def _has_cpu_kernel(tensor: Tensor, norm_type: float) -> bool:
    """Whether :func:`_cpu_power_sum` serves tensors like ``tensor``."""
    if tensor.device.type != "cpu":
        return False
    return math.isinf(norm_type) or (norm_type == 2.0 and tensor.dtype in (torch.float32, torch.float64))


def _cpu_power_sum(tensor: Tensor, norm_type: float) -> Tensor:
    """The power sum of one contiguous CPU tensor: BLAS dot for p = 2, aminmax for p = inf."""
    flat = tensor.view(-1)
    if norm_type == 2.0:
        return torch.dot(flat, flat)
    return torch.stack(torch.aminmax(flat)).abs().max()


def _foreach_power_sums(tensors: list[Tensor], norm_type: float) -> Tensor:
    """Per-tensor power sums by torch's foreach norm (empty tensors give 0), 1-D, accumulation dtype."""
    accumulate = accumulation_dtype(tensors[0].dtype)
    sums = torch.zeros(len(tensors), dtype=accumulate, device=tensors[0].device)
    filled = [i for i, t in enumerate(tensors) if t.numel()]  # the inf-norm kernel refuses empty tensors
    if filled:
        chosen = tensors if len(filled) == len(tensors) else [tensors[i] for i in filled]
        norms = torch.stack(torch._foreach_norm(chosen, norm_type, dtype=accumulate))
        values = norms if math.isinf(norm_type) else norms.pow(norm_type)
        if len(filled) == len(tensors):
            return values
        sums[filled] = values
    return sums


def _combine(sums: Tensor, norm_type: float) -> Tensor:
    """Power sums of parts -> the power sum of the whole: their sum (their max for p = inf)."""
    if sums.numel() == 0:
        return sums.new_zeros(())
    return sums.max() if math.isinf(norm_type) else sums.sum()


def power_sums(tensors: list[Tensor], norm_type: float) -> Tensor:
    """``[Σ|t_i|^p for each tensor]`` (``max|t_i|`` for p = inf), 1-D in the accumulation dtype.

    ``tensors``: one device and dtype, at least one. Empty tensors give 0.
    """
    if not _has_cpu_kernel(tensors[0], norm_type):
        return _foreach_power_sums(tensors, norm_type)
    large = [i for i, t in enumerate(tensors) if t.numel() >= CPU_DOT_MIN_NUMEL and t.is_contiguous()]
    if not large:
        return _foreach_power_sums(tensors, norm_type)
    accumulate = accumulation_dtype(tensors[0].dtype)
    sums = torch.zeros(len(tensors), dtype=accumulate, device=tensors[0].device)
    sums[large] = torch.stack([_cpu_power_sum(tensors[i], norm_type) for i in large]).to(accumulate)
    chosen = set(large)
    rest = [i for i in range(len(tensors)) if i not in chosen]
    if rest:
        sums[rest] = _foreach_power_sums([tensors[i] for i in rest], norm_type)
    return sums


def _packs(tensors: list[Tensor], limit: int) -> Iterator[tuple[list[Tensor], tuple[int, ...], int]]:
    """``(pack, trailing shape, numel)``: runs of ``tensors`` (each of at most ``limit`` elements) that
    concatenate along dim 0 into at most ``limit`` elements. Tensors of 2+ dims are grouped by shape (a
    shape's runs are cut without per-tensor sizes); 0-D and 1-D ones form one group (0-D ones as 1-D)."""
    by_shape: dict[torch.Size | None, list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_shape[tensor.shape if tensor.ndim > 1 else None].append(tensor)
    for shape, group in by_shape.items():
        if shape is not None:
            per_pack = limit // shape.numel()
            for start in range(0, len(group), per_pack):
                pack = group[start : start + per_pack]
                yield pack, tuple(shape[1:]), len(pack) * shape.numel()
            continue
        pack: list[Tensor] = []
        size = 0
        for tensor in group:
            numel = tensor.numel()
            if pack and size + numel > limit:
                yield pack, (), size
                pack, size = [], 0
            pack.append(tensor if tensor.ndim else tensor.view(1))
            size += numel
        if pack:
            yield pack, (), size


def total_power_sum(tensors: list[Tensor], norm_type: float) -> Tensor:
    """``Σ_i Σ|t_i|^p`` (``max_i max|t_i|`` for p = inf), 0-d in the accumulation dtype.

    ``tensors``: one device and dtype, at least one. On CPU (p = 2 or inf) tensors of at least
    :data:`CPU_DOT_MIN_NUMEL` elements get their own dot or aminmax, and smaller ones are packed into one
    buffer of at most :data:`PACK_NUMEL` elements, a pack at a time, each pack taking one.
    """
    first = tensors[0]
    if not _has_cpu_kernel(first, norm_type):
        return _combine(_foreach_power_sums(tensors, norm_type), norm_type)
    buffer_numel = _buffer_numel(PACK_NUMEL, sum(t.numel() for t in tensors))
    parts, packable, rest = _cpu_split(tensors, norm_type, buffer_numel)
    if len(packable) > 1:
        buffer = first.new_empty(buffer_numel)
        for pack, trailing, numel in _packs(packable, buffer.numel()):
            block = torch.cat(pack, out=buffer[:numel].view(-1, *trailing))
            parts.append(_cpu_power_sum(block, norm_type))
    else:
        rest += packable
    if rest:
        parts.append(_combine(_foreach_power_sums(rest, norm_type), norm_type))
    if not parts:
        return torch.zeros((), dtype=accumulation_dtype(first.dtype), device=first.device)
    return _combine(torch.stack(parts).to(accumulation_dtype(first.dtype)), norm_type)


def _cpu_split(
    tensors: list[Tensor], norm_type: float, buffer_numel: int
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """For :func:`total_power_sum` on CPU: the power sums of the large contiguous tensors (each its own
    kernel), the non-empty tensors that fit a buffer of ``buffer_numel`` elements (to be packed), and the
    rest (empty tensors left out)."""
    numels = [t.numel() for t in tensors]
    if min(numels) > 0 and max(numels) <= min(buffer_numel, CPU_DOT_MIN_NUMEL - 1):
        return [], list(tensors), []  # the common case of many small tensors: all packed
    parts: list[Tensor] = []
    packable: list[Tensor] = []
    rest: list[Tensor] = []
    for tensor, numel in zip(tensors, numels, strict=True):
        if numel >= CPU_DOT_MIN_NUMEL and tensor.is_contiguous():
            parts.append(_cpu_power_sum(tensor, norm_type))
        elif 0 < numel <= buffer_numel:
            packable.append(tensor)
        elif numel:
            rest.append(tensor)
    return parts, packable, rest


def scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """``t ← t · coef`` in place: ``coef`` is 0-d (one factor) or 1-D (one per tensor), on their device."""
    if coef.ndim == 0:
        torch._foreach_mul_(tensors, coef)
    else:
        torch._foreach_mul_(tensors, list(coef.unbind()))


def clamp_(tensors: list[Tensor], limit: float) -> None:
    """``t ← clamp(t, -limit, limit)`` in place: one pass for a large CPU tensor, else torch's foreach pair."""
    small = tensors
    if tensors[0].device.type == "cpu":
        small = []
        for t in tensors:
            if t.numel() >= CPU_DOT_MIN_NUMEL:
                t.clamp_(-limit, limit)
            else:
                small.append(t)
    if small:
        torch._foreach_clamp_min_(small, -limit)
        torch._foreach_clamp_max_(small, limit)


def unit_ndim(tensor: Tensor) -> int:
    """How many trailing dims make one AGC unit: all but the first for 2+ dims, else the whole tensor."""
    return tensor.ndim - 1 if tensor.ndim >= 2 else tensor.ndim


def unit_norms(tensor: Tensor, ndim: int | None = None) -> Tensor:
    """L2 norm of each unit over the last ``ndim`` dims (default :func:`unit_ndim`), kept broadcastable.

    For a Linear weight a unit is an output row, for a Conv weight an output filter (Brock et al. 2021).
    Accumulated in float32 (float64 for float64).
    """
    ndim = unit_ndim(tensor) if ndim is None else ndim
    accumulate = accumulation_dtype(tensor.dtype)
    if ndim == 0:
        return tensor.abs().to(accumulate)
    dims = tuple(range(tensor.ndim - ndim, tensor.ndim))
    return torch.linalg.vector_norm(tensor, dim=dims, keepdim=True, dtype=accumulate)


def _scale_units_one_(
    grad: Tensor, weight: Tensor, coefficient: UnitCoefficient
) -> Iterator[tuple[Tensor, Tensor]]:
    """One tensor's units; on CPU a large one a block of whole rows at a time."""
    ndim = unit_ndim(grad)
    parts: Iterable[tuple[Tensor, Tensor]] = [(grad, weight)]
    if grad.ndim >= 2 and grad.device.type == "cpu" and grad.numel() > CPU_REUSE_NUMEL:
        rows = max(1, CPU_REUSE_NUMEL // (grad.numel() // grad.shape[0]))
        parts = zip(grad.split(rows), weight.split(rows), strict=True)
    for grad_rows, weight_rows in parts:
        weight_norms = unit_norms(weight_rows, ndim)
        grad_norms = unit_norms(grad_rows, ndim)
        coef = coefficient(grad_norms, weight_norms)
        grad_rows.mul_(coef)
        yield grad_norms, coef


def _scale_units_stacked_(
    grads: list[Tensor], weights: list[Tensor], coefficient: UnitCoefficient, stack: Tensor
) -> tuple[Tensor, Tensor]:
    """Units of same-shaped tensors on their stack ``stack`` (shaped ``[len(grads), *shape]``): the
    weights' unit norms, then the grads', then the scaled grads copied back."""
    ndim = unit_ndim(grads[0])
    weight_norms = unit_norms(torch.stack(weights, out=stack), ndim)
    grad_norms = unit_norms(torch.stack(grads, out=stack), ndim)
    coef = coefficient(grad_norms, weight_norms)
    torch.unbind_copy(stack.mul_(coef), 0, out=grads)
    return grad_norms, coef


def scale_units_(
    grads: list[Tensor], weights: list[Tensor], coefficient: UnitCoefficient
) -> Iterator[tuple[Tensor, Tensor]]:
    """``G_u ← G_u · c_u`` with ``c_u = coefficient(‖G_u‖, ‖W_u‖)`` for every unit (see :func:`unit_norms`)
    of every grad; yields ``(‖G_u‖, c_u)`` per part (a tensor, or a stack of tensors) as it goes.

    ``grads`` and ``weights`` pair up and share one device and dtype. Tensors with at most
    :data:`STACK_NUMEL` / 4 elements are clipped on stacks of one shape.
    """
    stack_numel = max(_buffer_numel(STACK_NUMEL, sum(g.numel() for g in grads)), 1)
    stackable: dict[torch.Size, list[int]] = defaultdict(list)
    for i, grad in enumerate(grads):
        if 0 < grad.numel() * 4 <= stack_numel:
            stackable[grad.shape].append(i)
        else:
            yield from _scale_units_one_(grad, weights[i], coefficient)
    if not stackable:
        return
    buffer = torch.empty(stack_numel, dtype=grads[0].dtype, device=grads[0].device)
    for shape, indices in stackable.items():
        per_stack = stack_numel // shape.numel()
        for start in range(0, len(indices), per_stack):
            chunk = indices[start : start + per_stack]
            stack = buffer[: len(chunk) * shape.numel()].view(len(chunk), *shape)
            yield _scale_units_stacked_(
                [grads[i] for i in chunk], [weights[i] for i in chunk], coefficient, stack
            )


def _blocks(tensor: Tensor, numel: int) -> Iterator[Tensor]:
    """Views of ``tensor`` of at most ``numel`` elements (at least one row) that cover it: 1-D slices of a
    contiguous tensor, else slices of whole rows along dim 0."""
    if tensor.is_contiguous():
        yield from tensor.view(-1).split(numel)
        return
    yield from tensor.split(max(1, numel // max(1, tensor[0].numel())))


def _square_sum(block: Tensor) -> Tensor:
    """``Σ b²`` of one block in the accumulation dtype: a BLAS dot where :func:`_cpu_power_sum` serves it.

    A strided CPU block is summed in float64: torch's CPU reduction runs over one element by element, so
    its float32 sum drifts with the length (relative 4e-5 over 16,381 clamped elements, where a dot or a
    contiguous reduction stays near 1e-7)."""
    accumulate = accumulation_dtype(block.dtype)
    if block.is_contiguous() and _has_cpu_kernel(block, 2.0):
        return _cpu_power_sum(block, 2.0)
    if block.device.type == "cpu" and not block.is_contiguous():
        return torch.linalg.vector_norm(block, dtype=torch.float64).square().to(accumulate)
    return torch.linalg.vector_norm(block, dtype=accumulate).square()


BlockClamp = Callable[[Tensor, float, Tensor | None], tuple[Tensor, ...]]
"""``(block, λ, scratch) -> measured``: clamps one block in place and returns what it measured on it;
``scratch``, where asked for, is a buffer of the block's dtype at least as large as the block."""


def _clamp_block_(block: Tensor, limit: float, scratch: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σb², #{|b| > limit}, Σb² after)`` of one block, clamped in place in between (accumulation
    dtype); ``|b|`` goes to ``scratch`` for the count."""
    assert scratch is not None
    before = _square_sum(block)
    magnitude = torch.abs(block, out=scratch[: block.numel()].view_as(block))
    count = magnitude.gt_(limit).sum(dtype=accumulation_dtype(block.dtype))
    block.clamp_(-limit, limit)
    return before, count, _square_sum(block)


def _clamp_block_extremes_(block: Tensor, limit: float, scratch: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(min b, max b)`` of one block (its dtype; NaN if it holds NaN), then the block clamped in place."""
    low, high = torch.aminmax(block)
    block.clamp_(-limit, limit)
    return low, high


def _clamp_blockwise_(
    tensors: list[Tensor], limit: float, clamp_block: BlockClamp, scratch: bool
) -> list[tuple[Tensor, ...]]:
    """``clamp_block`` on every block of ``tensors``, each read from memory once; what each returned.

    Blocks: slices of at most :data:`CLAMP_BLOCK_NUMEL` elements of a tensor (on CPU; elsewhere of at
    most :data:`CHUNK_NUMEL`), and packs of tensors smaller than :data:`CPU_DOT_MIN_NUMEL`, copied into a
    buffer of at most :data:`CLAMP_PACK_NUMEL` elements, clamped there and copied back. ``scratch``: hand
    ``clamp_block`` a scratch buffer; the pack buffer and a pack's scratch then hold at most
    1/:data:`MEMORY_SHARE` of the elements together (else the pack buffer alone).
    """
    first = tensors[0]
    total = 0
    own, small = [], []
    for tensor in tensors:
        numel = tensor.numel()
        total += numel
        if numel >= CPU_DOT_MIN_NUMEL:
            own.append(tensor)
        elif numel:
            small.append(tensor)
    buffer_numel = _buffer_numel(CLAMP_PACK_NUMEL, total // 2 if scratch else total)
    packable = [t for t in small if t.numel() <= buffer_numel]
    if len(packable) < 2:  # nothing to gain from a copy
        packable = []
    own += [t for t in small if t.numel() > buffer_numel or not packable]
    on_cpu = first.device.type == "cpu"
    block_numel = max(CLAMP_BLOCK_NUMEL if on_cpu else _buffer_numel(CHUNK_NUMEL, total), CPU_DOT_MIN_NUMEL)
    blocks = [block for tensor in own for block in _blocks(tensor, block_numel)]
    largest = max([block.numel() for block in blocks] + [buffer_numel * bool(packable)])
    spare = first.new_empty(largest) if scratch else None
    parts = [clamp_block(block, limit, spare) for block in blocks]
    if packable:
        buffer = first.new_empty(buffer_numel)
        for pack, trailing, numel in _packs(packable, buffer_numel):
            block = torch.cat(pack, out=buffer[:numel].view(-1, *trailing))
            parts.append(clamp_block(block, limit, spare))
            torch._foreach_copy_(pack, block.split([t.shape[0] for t in pack]))
    return parts


def clamp_with_stats_(tensors: list[Tensor], limit: float) -> tuple[Tensor, Tensor, Tensor]:
    """``t ← clamp(t, -limit, limit)`` in place, as :func:`clamp_`, with the statistics of all ``tensors``
    together: ``(Σ t² before, #{|t| > limit}, Σ t² after)``, 0-d, the sums in the accumulation dtype, the
    count int64 (a NaN element is not counted, and stays NaN).

    ``tensors``: one device and dtype, at least one. A block at a time (see :func:`_clamp_blockwise_`) is
    measured, counted, clamped and measured again, so that it is read from memory once.
    """
    parts = _clamp_blockwise_(tensors, limit, _clamp_block_, scratch=True)
    if not parts:
        zero = torch.zeros((), dtype=accumulation_dtype(tensors[0].dtype), device=tensors[0].device)
        return zero, zero.to(torch.int64), zero
    before, count, after = (torch.stack(values) for values in zip(*parts, strict=True))
    return before.sum(), count.to(torch.int64).sum(), after.sum()


def clamp_with_peak_(tensors: list[Tensor], limit: float) -> Tensor:
    """``t ← clamp(t, -limit, limit)`` in place, as :func:`clamp_`, returning ``max|t|`` of all ``tensors``
    before (0-d, in their dtype; NaN where one holds NaN; 0 without elements). A block at a time (see
    :func:`_clamp_blockwise_`) is read for its extremes and clamped while in cache.
    """
    parts = _clamp_blockwise_(tensors, limit, _clamp_block_extremes_, scratch=False)
    if not parts:
        return tensors[0].new_zeros(())
    lows, highs = (torch.stack(values) for values in zip(*parts, strict=True))
    return torch.maximum(highs.max(), lows.min().neg())
