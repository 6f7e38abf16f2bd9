"""The primitives every rule is built from, and the kernels behind them.

Each primitive takes tensors of one device and one dtype (callers group them; see
:func:`~gradclip_algo.norms.group_by_device_and_dtype`) and returns what a plain foreach loop would:

- :func:`power_sums`: per-tensor ``Σ|t|^p`` (``max|t|`` for p = inf);
- :func:`total_power_sum`: the same for all tensors together;
- :func:`scale_`: ``t ← t · c`` with one factor or one per tensor;
- :func:`clamp_`: ``t ← clamp(t, -λ, λ)``;
- :func:`clamp_with_stats_`: the same, with ``Σt²`` before and after and ``#{|t| > λ}`` of all tensors;
- :func:`scale_units_`: ``G_u ← G_u · f(‖G_u‖, ‖W_u‖)`` per unit u (AGC), with the sums of its statistics.

Sums are accumulated in float32, or float64 for float64 tensors (as torch's norms are).

'value' with its statistics and the L2 norm (of groups of at least :data:`NORM_ROWS_MIN_NUMEL` elements)
work on 2-D blocks of rows of :data:`ROW_NUMEL` elements (:func:`_split_rows`): the rows of each
contiguous tensor of at least 2 rows; the rest (its last partial row, the smaller tensors and the strided
ones) is measured on copies, packed into a buffer of rows a pack at a time and zero-padded (a zero is
neither counted nor adds to a sum). 'value' runs one plain torch function over a block
(:func:`_clamp_rows_`), each row measured, then clamped: compiled (:mod:`gradclip_algo.compiled`; groups
of at least :data:`COMPILE_MIN_NUMEL` elements), one loop over rows that reads a row from memory once, the
write finding it in cache; eager, the same as torch ops a block of :data:`BLOCK_NUMEL` elements at a time
(:func:`_clamp_rows_eagerly_`). The rest is then clamped in place by :func:`clamp_`. The norm takes torch's
norm of each row of a block; smaller groups, torch's foreach norm.

AGC runs eagerly: per tensor its unit norms, factors and one multiply (on CPU, a large tensor a block of
rows at a time, still in cache for the multiply), and small tensors of one shape on their stack, a few ops
per stack instead of a few per tensor. Everything else is the foreach kernel torch
uses. No primitive reads a tensor's value on the host.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from itertools import chain

import torch
from torch import Tensor

from gradclip_algo import compiled

ROW_NUMEL = 1 << 12
"""'value' and the norm take a contiguous tensor of at least ``2 * ROW_NUMEL`` elements as rows of this
many (16 KiB of float32: the L1 cache); 'value' without statistics clamps it in one pass of its own."""
COMPILE_MIN_NUMEL = 1 << 20
"""Compiled kernels run for a group of tensors with at least this many elements together."""
NORM_ROWS_MIN_NUMEL = 1 << 22
"""The L2 norm takes the rows of blocks for a group of at least this many elements (below it, torch's
foreach norm is as fast)."""
PARALLEL_MIN_NUMEL = 1 << 18
"""A compiled kernel runs on all of torch's threads for a block of at least this many elements, else on
one (CPU): below it, starting the other threads costs more than they save."""
COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes kernels are compiled for (each compiles its own graphs; float64 grads run eagerly)."""
PACK_NUMEL = 1 << 18
"""Elements of the buffer that 'value' packs small and strided tensors into (1 MiB of float32)."""
CPU_REUSE_NUMEL = 1 << 22
"""AGC on CPU clips a larger tensor a block of whole rows of at most this many elements (16 MiB of
float32) at a time, so that the block is still in the L3 cache when it is multiplied after its norms."""
STACK_NUMEL = 1 << 20
"""Elements of the buffer that AGC stacks small same-shaped weights, then grads, in."""
BLOCK_NUMEL = 1 << 20
"""Eager 'value' runs on blocks of whole rows of at most this many elements (4 MiB of float32: the L3
cache), with one scratch block."""
MEMORY_SHARE = 128
"""AGC's stacks hold at most 1/128 of the elements of the tensors they serve (under 1 % extra memory)."""
PACK_SHARE = 16
"""The pack buffer of 'value' and the norm holds at most 1/16 of the elements it serves, and at most
:data:`PACK_NUMEL`: fewer, larger packs, each one call of a compiled kernel."""
SIZE_LIMITS = (
    2 * ROW_NUMEL,
    PACK_SHARE * 2 * ROW_NUMEL,
    PARALLEL_MIN_NUMEL,
    COMPILE_MIN_NUMEL,
    STACK_NUMEL,
    NORM_ROWS_MIN_NUMEL,
    CPU_REUSE_NUMEL,
)
"""The sizes at which a path starts or a buffer fills: the fuzz draws tensors on and around them."""

UnitCoefficient = Callable[[Tensor, Tensor], Tensor]
"""``(‖G_u‖, ‖W_u‖) -> c_u``: the factor of each unit, from its grad and weight norms (same shapes)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, else float32: the dtype sums and norms are accumulated in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _foreach_power_sums(tensors: list[Tensor], norm_type: float) -> Tensor:
    """Per-tensor power sums by torch's foreach norm (empty tensors give 0), 1-D, accumulation dtype."""
    accumulate = accumulation_dtype(tensors[0].dtype)
    if all(map(Tensor.numel, tensors)):
        norms = torch.stack(torch._foreach_norm(tensors, norm_type, dtype=accumulate))
        return norms if math.isinf(norm_type) else norms.pow(norm_type)
    sums = torch.zeros(len(tensors), dtype=accumulate, device=tensors[0].device)
    filled = [i for i, t in enumerate(tensors) if t.numel()]  # the inf-norm kernel refuses empty tensors
    if filled:
        sums[filled] = _foreach_power_sums([tensors[i] for i in filled], norm_type)
    return sums


def power_sums(tensors: list[Tensor], norm_type: float) -> Tensor:
    """``[Σ|t_i|^p for each tensor]`` (``max|t_i|`` for p = inf), 1-D in the accumulation dtype.

    ``tensors``: one device and dtype, at least one. Empty tensors give 0.
    """
    return _foreach_power_sums(tensors, norm_type)


def total_power_sum(tensors: list[Tensor], norm_type: float) -> Tensor:
    """``Σ_i Σ|t_i|^p`` (``max_i max|t_i|`` for p = inf), 0-d in the accumulation dtype.

    ``tensors``: one device and dtype, at least one. For p = 2 and at least :data:`NORM_ROWS_MIN_NUMEL`
    elements, the norms of the rows of their blocks (see :func:`_split_rows`): a norm over each row of a
    2-D block is faster than torch's norm of a whole tensor, and a pack of small tensors is one op; else
    torch's foreach norm.
    """
    total = sum(map(Tensor.numel, tensors))
    if norm_type != 2.0 or total < NORM_ROWS_MIN_NUMEL:
        sums = _foreach_power_sums(tensors, norm_type)
        return sums.max() if math.isinf(norm_type) else sums.sum()
    accumulate = accumulation_dtype(tensors[0].dtype)
    rows, rest, capacity = _split_rows(tensors, total)
    norms = [
        torch.linalg.vector_norm(block, dim=1, dtype=accumulate)
        for block in chain(rows, _packed_rows(rest, capacity))
    ]
    return torch.cat(norms).square().sum()


def scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """``t ← t · coef`` in place: ``coef`` is 0-d (one factor) or 1-D (one per tensor), on their device."""
    if coef.ndim == 0:
        torch._foreach_mul_(tensors, coef)
    else:
        torch._foreach_mul_(tensors, list(coef.unbind()))


def clamp_(tensors: list[Tensor], limit: float) -> None:
    """``t ← clamp(t, -limit, limit)`` in place: one pass for a tensor of at least 2 rows of
    :data:`ROW_NUMEL`, else torch's foreach pair (a clamp-min and a clamp-max pass)."""
    small = []
    for tensor in tensors:
        if tensor.numel() >= 2 * ROW_NUMEL:
            tensor.clamp_(-limit, limit)
        else:
            small.append(tensor)
    if small:
        torch._foreach_clamp_min_(small, -limit)
        torch._foreach_clamp_max_(small, limit)


def _run(
    kernel: Callable[..., tuple[Tensor, ...]],
    eager: Callable[..., tuple[Tensor, ...]],
    compile_: bool,
    rows: Tensor,
    *args: object,
) -> tuple[Tensor, ...]:
    """``kernel(rows, *args)`` compiled where ``compile_`` and :mod:`~gradclip_algo.compiled` allow it and
    ``rows`` is a contiguous 2-D tensor of at least 2 x 2 elements of :data:`COMPILED_DTYPES`, else
    ``eager(rows, *args)``. Compiled,
    the tensors are passed detached (the same memory, not a view of another tensor), so that the guards
    of a compiled kernel do not depend on the tensors ``rows`` was cut from; rows of fewer than
    :data:`PARALLEL_MIN_NUMEL` elements go to its one-thread form."""
    if compile_ and rows.dtype in COMPILED_DTYPES and min(rows.shape) >= 2 and rows.is_contiguous():
        detached = [arg.detach() if isinstance(arg, Tensor) else arg for arg in args]
        parallel = rows.numel() >= PARALLEL_MIN_NUMEL
        return compiled.run(kernel, eager, rows.device, rows.detach(), *detached, parallel=parallel)
    return eager(rows, *args)


# ---- value: the clamp with its statistics ---------------------------------------------------------------


def _clamp_rows_(rows: Tensor, bound: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Clamp the 2-D ``rows`` to ``[-bound, bound]`` in place (``bound``: 0-d, their dtype); returns per
    row ``(Σ row², #{|row| > bound}, Σ clamped²)`` in the accumulation dtype.

    Each row is measured, then written where it holds an element beyond the bound (elsewhere the clamp
    keeps every value): the write depends on the row's count, so a compiled kernel finishes a row
    before the next."""
    values = rows.to(accumulation_dtype(rows.dtype))  # rows itself where they are float32 or float64
    limit = bound.to(values.dtype)
    count = values.abs().gt(limit).to(values.dtype).sum(1)  # exact: a row has at most 2^24 elements
    squares = values * values  # clamp(x)² = min(x², λ²), NaN kept
    before, after = squares.sum(1), torch.minimum(squares, limit * limit).sum(1)  # before rows change
    rows.copy_(torch.where(count.unsqueeze(1) > 0, values.clamp(-limit, limit), values).to(rows.dtype))
    return before, count, after


def _clamp_rows_eagerly_(rows: Tensor, bound: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_clamp_rows_` as eager torch ops, on blocks of whole rows of at most :data:`BLOCK_NUMEL`
    elements (in cache for the ops after the first): its rows' norms, its count through one scratch block,
    its clamp and its rows' norms again. Returns one sum per block, not per row."""
    accumulate = accumulation_dtype(rows.dtype)
    per_block = max(1, BLOCK_NUMEL // rows.shape[1])
    scratch = rows.new_empty(min(per_block, rows.shape[0]), rows.shape[1])
    parts = []
    for block in rows.split(per_block):
        before = torch.linalg.vector_norm(block, dim=1, dtype=accumulate).square().sum()
        count = torch.abs(block, out=scratch[: block.shape[0]]).gt_(bound).sum(dtype=accumulate)
        block.clamp_(-bound, bound)
        after = torch.linalg.vector_norm(block, dim=1, dtype=accumulate).square().sum()
        parts.append(torch.stack([before, count, after]))
    before, count, after = torch.stack(parts).unbind(1)
    return before, count, after


def _pieces(tensor: Tensor, limit: int) -> Iterator[Tensor]:
    """Views of ``tensor`` of at most ``limit`` elements that cover it: slices along the first dim, each
    cut in turn where one slice alone is larger."""
    if tensor.numel() <= limit:
        yield tensor
        return
    per_slice = limit // tensor[0].numel()
    if per_slice:
        yield from tensor.split(per_slice)
        return
    for part in tensor:
        yield from _pieces(part, limit)


def _packs(pieces: list[Tensor], limit: int) -> Iterator[tuple[list[Tensor], tuple[int, ...], int]]:
    """``(pack, trailing shape, numel)``: runs of ``pieces`` (each of at most ``limit`` elements) that
    concatenate along dim 0 into at most ``limit`` elements. Pieces of 2+ dims are grouped by shape (a
    shape's runs are cut without per-piece sizes); 0-D and 1-D ones form one group (0-D ones as 1-D)."""
    by_shape: dict[torch.Size | None, list[Tensor]] = defaultdict(list)
    for piece in pieces:
        by_shape[piece.shape if piece.ndim > 1 else None].append(piece)
    for shape, group in by_shape.items():
        if shape is not None:
            per_pack = limit // shape.numel()
            for start in range(0, len(group), per_pack):
                pack = group[start : start + per_pack]
                yield pack, tuple(shape[1:]), len(pack) * shape.numel()
            continue
        pack: list[Tensor] = []
        size = 0
        for piece in group:
            numel = piece.numel()
            if pack and size + numel > limit:
                yield pack, (), size
                pack, size = [], 0
            pack.append(piece if piece.ndim else piece.view(1))
            size += numel
        if pack:
            yield pack, (), size


def _split_rows(tensors: list[Tensor], total: int) -> tuple[list[Tensor], list[Tensor], int]:
    """``(rows, rest, capacity)``: every element of ``tensors`` (``total`` of them) once, as 2-D views of
    rows of :data:`ROW_NUMEL` elements of each contiguous tensor of at least 2 rows, and the rest (their last
    partial rows, smaller and strided tensors), cut into pieces of at most ``capacity`` elements: the size
    of the buffer :func:`_packed_rows` copies them into, at most :data:`PACK_NUMEL` elements and
    1/:data:`PACK_SHARE` of all (at least 2 rows)."""
    capacity = max(2 * ROW_NUMEL, min(PACK_NUMEL, total // PACK_SHARE) // ROW_NUMEL * ROW_NUMEL)
    rows: list[Tensor] = []
    rest: list[Tensor] = []
    for tensor in tensors:
        numel = tensor.numel()
        if numel >= 2 * ROW_NUMEL and tensor.is_contiguous():
            flat = tensor.view(-1)
            whole = numel - numel % ROW_NUMEL
            rows.append(flat[:whole].view(-1, ROW_NUMEL))
            if whole < numel:
                rest.append(flat[whole:])
        elif numel > capacity:
            rest.extend(_pieces(tensor, capacity))
        elif numel:
            rest.append(tensor)
    return rows, rest, capacity


def _packed_rows(pieces: list[Tensor], capacity: int) -> Iterator[Tensor]:
    """Copies of ``pieces`` (each of at most ``capacity`` elements), a pack at a time, in one buffer of
    ``capacity`` elements, zero-padded to whole rows (at least 2): each yielded block is overwritten by the
    next."""
    if not pieces:
        return
    buffer = pieces[0].new_empty(capacity)
    for pack, trailing, numel in _packs(pieces, capacity):
        torch.cat(pack, out=buffer[:numel].view(-1, *trailing))
        padded = max(2 * ROW_NUMEL, -(-numel // ROW_NUMEL) * ROW_NUMEL)
        buffer[numel:padded].zero_()
        yield buffer[:padded].view(-1, ROW_NUMEL)


def clamp_with_stats_(tensors: list[Tensor], limit: float) -> tuple[Tensor, Tensor, Tensor]:
    """``t ← clamp(t, -limit, limit)`` in place, as :func:`clamp_`, with the statistics of all ``tensors``
    together: ``(Σ t² before, #{|t| > limit}, Σ t² after)``, 0-d, the sums in the accumulation dtype, the
    count int64 (a NaN element is not counted, and stays NaN). ``limit`` is taken in the tensors' dtype,
    as torch's clamp does.

    ``tensors``: one device and dtype, at least one. Rows of each tensor, and packed copies of the rest
    (see the module's docstring), go through :func:`_clamp_rows_`; the rest is then clamped by
    :func:`clamp_`.
    """
    first = tensors[0]
    bound = torch.full((), limit, dtype=first.dtype, device=first.device)
    total = sum(map(Tensor.numel, tensors))
    compile_ = total >= COMPILE_MIN_NUMEL
    rows, rest, capacity = _split_rows(tensors, total)
    parts = [
        _run(_clamp_rows_, _clamp_rows_eagerly_, compile_, block, bound)
        for block in chain(rows, _packed_rows(rest, capacity))  # a packed block is a copy: only measured
    ]
    clamp_(rest, limit)  # in place, after its packs were measured
    if not parts:
        zero = torch.zeros((), dtype=accumulation_dtype(first.dtype), device=first.device)
        return zero, zero.to(torch.int64), zero
    before, count, after = (torch.cat(values) for values in zip(*parts, strict=True))
    return before.sum(), count.to(torch.int64).sum(), after.sum()


# ---- AGC: per-unit factors -------------------------------------------------------------------------------


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


def unit_sums(grad_norms: Tensor, coef: Tensor) -> Tensor:
    """``[Σ‖G_u‖², Σ(c_u‖G_u‖)², #{c_u < 1}]`` over units (1-D), in the norms' dtype."""
    return torch.stack(
        [
            grad_norms.square().sum(),
            (grad_norms * coef).square().sum(),
            (coef < 1.0).sum().to(grad_norms.dtype),
        ]
    )


UnitParts = list[tuple[Tensor, Tensor]]
"""``(‖G_u‖, c_u)`` of some units, each pair flattened to 1-D."""


def _scale_units_one_(grad: Tensor, weight: Tensor, coefficient: UnitCoefficient, parts: UnitParts) -> None:
    """One tensor's units: their norms, factors and scaling, appended to ``parts``. On CPU a tensor of
    more than :data:`CPU_REUSE_NUMEL` elements a block of whole rows at a time: its norms, then its
    multiply while the block is still in cache."""
    ndim = unit_ndim(grad)
    blocks = [(grad, weight)]
    if grad.ndim >= 2 and grad.device.type == "cpu" and grad.numel() > CPU_REUSE_NUMEL:
        rows = max(1, CPU_REUSE_NUMEL // (grad.numel() // grad.shape[0]))
        blocks = list(zip(grad.split(rows), weight.split(rows), strict=True))
    for grad_rows, weight_rows in blocks:
        grad_norms = unit_norms(grad_rows, ndim)
        coef = coefficient(grad_norms, unit_norms(weight_rows, ndim))
        grad_rows.mul_(coef)
        parts.append((grad_norms.reshape(-1), coef.reshape(-1)))


def _scale_units_stacked_(
    grads: list[Tensor], weights: list[Tensor], coefficient: UnitCoefficient, stack: Tensor
) -> tuple[Tensor, int]:
    """Units of same-shaped tensors on their stack ``stack`` (shaped ``[len(grads), *shape]``): the
    weights' unit norms, then the grads', then the scaled grads copied back; returns their
    :func:`unit_sums` and how many units they are."""
    ndim = unit_ndim(grads[0])
    weight_norms = unit_norms(torch.stack(weights, out=stack), ndim)
    grad_norms = unit_norms(torch.stack(grads, out=stack), ndim)
    coef = coefficient(grad_norms, weight_norms)
    torch.unbind_copy(stack.mul_(coef), 0, out=grads)
    return unit_sums(grad_norms, coef), grad_norms.numel()


def _summed(parts: UnitParts) -> Tensor:
    """:func:`unit_sums` of the units of all ``parts`` together."""
    norms, coefs = (torch.cat(values) for values in zip(*parts, strict=True))
    return unit_sums(norms, coefs)


def scale_units_(
    grads: list[Tensor], weights: list[Tensor], coefficient: UnitCoefficient
) -> tuple[Tensor, int]:
    """``G_u ← G_u · c_u`` with ``c_u = coefficient(‖G_u‖, ‖W_u‖)`` for every unit (see :func:`unit_norms`)
    of every grad; returns ``[Σ‖G_u‖², Σ(c_u‖G_u‖)², #{c_u < 1}]`` (1-D, accumulation dtype) and the
    number of units.

    ``grads`` and ``weights`` pair up and share one device and dtype. Tensors of at most ``STACK_NUMEL /
    4`` elements (and 1/(4 · MEMORY_SHARE) of all) are clipped on stacks of one shape, a few ops per stack
    instead of a few per tensor. The statistics are summed per stack, and once for the units of all
    other tensors together (their norms and factors, one number per unit, gathered first).
    """
    stack_numel = max(min(STACK_NUMEL, sum(map(Tensor.numel, grads)) // MEMORY_SHARE), 1)
    stackable: dict[torch.Size, list[int]] = defaultdict(list)
    parts: UnitParts = []
    for i, grad in enumerate(grads):
        if 0 < grad.numel() * 4 <= stack_numel:
            stackable[grad.shape].append(i)
        else:
            _scale_units_one_(grad, weights[i], coefficient, parts)
    units = sum(norms.numel() for norms, _ in parts)
    sums = [_summed(parts)] if parts else []
    buffer = grads[0].new_empty(stack_numel) if stackable else None
    for shape, indices in stackable.items():
        per_stack = stack_numel // shape.numel()
        for start in range(0, len(indices), per_stack):
            chunk = indices[start : start + per_stack]
            stack = buffer[: len(chunk) * shape.numel()].view(len(chunk), *shape)
            stack_sums, stack_units = _scale_units_stacked_(
                [grads[i] for i in chunk], [weights[i] for i in chunk], coefficient, stack
            )
            sums.append(stack_sums)
            units += stack_units
    if not sums:
        return torch.zeros(3, dtype=accumulation_dtype(grads[0].dtype), device=grads[0].device), units
    return torch.stack(sums).sum(0), units
