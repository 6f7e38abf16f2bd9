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

The two that read and write every element with statistics, :func:`clamp_with_stats_` and
:func:`scale_units_`, run one function each over a 2-D block of rows (:func:`_clamp_rows_`,
:func:`_scale_rows_`): each row is reduced, then written. Compiled (:mod:`gradclip_algo.compiled`), it
is one kernel that reads a row from memory once: the write finds it in cache. Eager, the same function
runs as torch ops, a block of at most :data:`BLOCK_NUMEL` elements at a time. How tensors become rows:

- value: a contiguous tensor of at least 2 rows is cut into rows of :data:`ROW_NUMEL` elements; the rest
  (its last partial row, smaller tensors, strided ones) is copied into a buffer of rows, a pack at a time,
  zero-padded (a zero is neither counted nor adds to a sum), and copied back;
- AGC: a row is a unit (an output row or filter); small tensors of one shape are stacked, a stack at a time.

Compiled kernels run for groups of at least :data:`COMPILE_MIN_NUMEL` elements: below it their compile
time would not pay off. Everything else is the foreach kernel torch uses. No primitive reads a tensor's
value on the host.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from gradclip_algo import compiled

ROW_NUMEL = 1 << 12
"""'value' clips a contiguous tensor of at least ``2 * ROW_NUMEL`` elements as rows of this many (16 KiB
of float32: the L1 cache), and gets its own one-pass clamp without statistics."""
COMPILE_MIN_NUMEL = 1 << 20
"""Compiled kernels run for a group of tensors with at least this many elements together."""
PACK_NUMEL = 1 << 18
"""Elements of the buffer that 'value' packs small and strided tensors into (1 MiB of float32)."""
STACK_NUMEL = 1 << 20
"""Elements of the two buffers that AGC stacks small same-shaped weights and grads in."""
BLOCK_NUMEL = 1 << 18
"""Eager kernels run on blocks of whole rows of at most this many elements (their temporaries)."""
MEMORY_SHARE = 128
"""A rule's buffers hold at most 1/128 of the elements of the tensors they serve (under 1 % extra memory),
or 2 rows of ``ROW_NUMEL`` for 'value'."""
SIZE_LIMITS = (
    2 * ROW_NUMEL,
    PACK_NUMEL,
    STACK_NUMEL,
    COMPILE_MIN_NUMEL,
    MEMORY_SHARE * PACK_NUMEL // 4,
)
"""The sizes at which a path starts or a buffer fills: the fuzz draws tensors on and around them."""

UnitCoefficient = Callable[..., Tensor]
"""``(‖G_u‖, ‖W_u‖, *params) -> c_u``: the factor of each unit from its grad and weight norms (same
shapes) and the rule's parameters (0-d tensors on their device)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, else float32: the dtype sums and norms are accumulated in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def power_sums(tensors: list[Tensor], norm_type: float) -> Tensor:
    """``[Σ|t_i|^p for each tensor]`` (``max|t_i|`` for p = inf), 1-D in the accumulation dtype.

    ``tensors``: one device and dtype, at least one. Empty tensors give 0.
    """
    return _foreach_power_sums(tensors, norm_type)


def total_power_sum(tensors: list[Tensor], norm_type: float) -> Tensor:
    """``Σ_i Σ|t_i|^p`` (``max_i max|t_i|`` for p = inf), 0-d in the accumulation dtype.

    ``tensors``: one device and dtype, at least one. For p = 2 the rows of each tensor (see the module's
    docstring) go through :func:`_square_sum` where compiled kernels run; the rest, torch's foreach norm.
    """
    rows: list[Tensor] = []
    rest = tensors
    if norm_type == 2.0 and sum(t.numel() for t in tensors) >= COMPILE_MIN_NUMEL:
        rows, rest = _rows_and_rest(tensors)
    parts = [_run(_row_square_sums, _row_square_sums, True, block)[0] for block in rows]
    if rest:
        sums = _foreach_power_sums(rest, norm_type)
        parts.append((sums.max() if math.isinf(norm_type) else sums.sum()).view(1))
    return torch.cat(parts).sum() if len(parts) > 1 else parts[0][0]


def _row_square_sums(rows: Tensor) -> tuple[Tensor]:
    """``Σ row²`` of each row of the 2-D ``rows``, in the accumulation dtype."""
    return (torch.linalg.vector_norm(rows, dim=1, dtype=accumulation_dtype(rows.dtype)).square(),)


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
    ``rows`` is a contiguous 2-D tensor of at least 2 x 2 elements, else ``eager(rows, *args)``. Compiled,
    the tensors are passed detached (the same memory, not a view of another tensor), so that the guards
    of a compiled kernel do not depend on the tensors ``rows`` was cut from."""
    if compile_ and rows.ndim == 2 and min(rows.shape) >= 2 and rows.is_contiguous():
        detached = [arg.detach() if isinstance(arg, Tensor) else arg for arg in args]
        return compiled.run(kernel, eager, rows.device, rows.detach(), *detached)
    return eager(rows, *args)


# ---- value: the clamp with its statistics ---------------------------------------------------------------


def _clamp_rows_(rows: Tensor, bound: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Clamp the 2-D ``rows`` to ``[-bound, bound]`` in place (``bound``: 0-d, their dtype); returns per
    row ``(Σ row², #{|row| > bound}, Σ clamped²)``, the sums in the accumulation dtype, the count int64.

    Each row is measured, then written where it holds an element beyond the bound (elsewhere the clamp
    keeps every value): the write depends on the row's count, so a compiled kernel finishes a row
    before the next."""
    accumulate = accumulation_dtype(rows.dtype)
    count = rows.abs().gt(bound).sum(1)
    clamped = rows.clamp(-bound, bound)
    before = torch.linalg.vector_norm(rows, dim=1, dtype=accumulate)
    after = torch.linalg.vector_norm(clamped, dim=1, dtype=accumulate)
    rows.copy_(torch.where(count.unsqueeze(1) > 0, clamped, rows))
    return before.square(), count, after.square()


def _clamp_rows_in_blocks_(rows: Tensor, bound: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eager :func:`_clamp_rows_` (its temporaries are as large as its rows) on blocks of whole rows of at
    most :data:`BLOCK_NUMEL` elements."""
    parts = [_clamp_rows_(block, bound) for block in rows.split(max(1, BLOCK_NUMEL // rows.shape[1]))]
    before, count, after = (torch.cat(values) for values in zip(*parts, strict=True))
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


def _rows_and_rest(tensors: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The rows views (``[k, ROW_NUMEL]``, k >= 2) of the contiguous tensors of at least 2 rows, and the
    rest: their last partial rows and the other tensors."""
    rows, rest = [], []
    for tensor in tensors:
        numel = tensor.numel()
        if numel >= 2 * ROW_NUMEL and tensor.is_contiguous():
            flat = tensor.view(-1)
            whole = numel - numel % ROW_NUMEL
            rows.append(flat[:whole].view(-1, ROW_NUMEL))
            if whole < numel:
                rest.append(flat[whole:])
        else:
            rest.append(tensor)
    return rows, rest


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


def clamp_with_stats_(tensors: list[Tensor], limit: float) -> tuple[Tensor, Tensor, Tensor]:
    """``t ← clamp(t, -limit, limit)`` in place, as :func:`clamp_`, with the statistics of all ``tensors``
    together: ``(Σ t² before, #{|t| > limit}, Σ t² after)``, 0-d, the sums in the accumulation dtype, the
    count int64 (a NaN element is not counted, and stays NaN). ``limit`` is taken in the tensors' dtype,
    as torch's clamp does.

    ``tensors``: one device and dtype, at least one. Rows of each tensor, and packs of the rest in a
    buffer of rows (see the module's docstring), go through :func:`_clamp_rows_`.
    """
    first = tensors[0]
    total = sum(t.numel() for t in tensors)
    bound = torch.full((), limit, dtype=first.dtype, device=first.device)
    compile_ = total >= COMPILE_MIN_NUMEL
    capacity = max(2 * ROW_NUMEL, min(PACK_NUMEL, total // MEMORY_SHARE) // ROW_NUMEL * ROW_NUMEL)
    rows, whole = _rows_and_rest(tensors)
    rest = [piece for tensor in whole if tensor.numel() for piece in _pieces(tensor, capacity)]
    parts = [_run(_clamp_rows_, _clamp_rows_in_blocks_, compile_, block, bound) for block in rows]
    if rest:
        needed = -(-sum(piece.numel() for piece in rest) // ROW_NUMEL) * ROW_NUMEL
        buffer = first.new_empty(max(2 * ROW_NUMEL, min(capacity, needed)))
        for pack, trailing, numel in _packs(rest, capacity):
            block = torch.cat(pack, out=buffer[:numel].view(-1, *trailing))
            padded = max(2 * ROW_NUMEL, -(-numel // ROW_NUMEL) * ROW_NUMEL)
            buffer[numel:padded].zero_()
            parts.append(
                _run(
                    _clamp_rows_, _clamp_rows_in_blocks_, compile_, buffer[:padded].view(-1, ROW_NUMEL), bound
                )
            )
            torch._foreach_copy_(pack, block.split([piece.shape[0] for piece in pack]))
    if not parts:
        zero = torch.zeros((), dtype=accumulation_dtype(first.dtype), device=first.device)
        return zero, zero.to(torch.int64), zero
    before, count, after = (torch.cat(values).sum() for values in zip(*parts, strict=True))
    return before, count, after


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


def unit_sums(grad_norms: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ‖G_u‖², Σ(c_u‖G_u‖)², #{c_u < 1})`` over units, in the norms' dtype."""
    return (
        grad_norms.square().sum(),
        (grad_norms * coef).square().sum(),
        (coef < 1.0).sum().to(grad_norms.dtype),
    )


def _scale_rows_(
    grad: Tensor, weight: Tensor, coefficient: UnitCoefficient, params: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """``G_u ← G_u · c_u`` for every unit u = ``grad[u]`` (a row of a 2-D ``grad``; 2+ dims, each slice
    along the first), ``c_u = coefficient(‖G_u‖, ‖W_u‖, *params)``; returns ``(‖G_u‖, c_u)``, kept
    broadcastable, in the accumulation dtype."""
    dims = tuple(range(1, grad.ndim))
    accumulate = accumulation_dtype(grad.dtype)
    grad_norms = torch.linalg.vector_norm(grad, dim=dims, keepdim=True, dtype=accumulate)
    weight_norms = torch.linalg.vector_norm(weight, dim=dims, keepdim=True, dtype=accumulate)
    coef = coefficient(grad_norms, weight_norms, *params)
    grad.mul_(coef)
    return grad_norms, coef


def _as_units(*tensors: Tensor) -> list[Tensor]:
    """``tensors`` (of one shape) with one unit per slice along the first dim: as rows where they have
    2+ dims and are all contiguous and not empty, as they are otherwise; 0-D and 1-D ones as one row."""
    first = tensors[0]
    if first.ndim < 2:
        return [t.reshape(1, 1) if t.ndim == 0 else t.unsqueeze(0) for t in tensors]
    if first.numel() and all(t.is_contiguous() for t in tensors):
        return [t.view(first.shape[0], -1) for t in tensors]
    return list(tensors)


def _stacks(grads: list[Tensor], weights: list[Tensor], stack_numel: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Stacks of at most ``stack_numel`` elements of the grads of one shape and their weights, each as
    rows (one unit per row); yields a stack's rows and its weights' rows, and copies the
    rows back into the grads when the next stack is asked for. Two buffers of ``stack_numel`` elements
    hold them."""
    shape = grads[0].shape
    per_stack = stack_numel // shape.numel()
    unit_numel = _as_units(grads[0])[0][0].numel()
    grad_buffer, weight_buffer = (grads[0].new_empty(per_stack * shape.numel()) for _ in (0, 1))
    for start in range(0, len(grads), per_stack):
        chunk = slice(start, start + per_stack)
        count = len(grads[chunk])
        grad_stack = torch.stack(grads[chunk], out=grad_buffer[: count * shape.numel()].view(count, *shape))
        weight_stack = torch.stack(
            weights[chunk], out=weight_buffer[: count * shape.numel()].view(count, *shape)
        )
        yield grad_stack.view(-1, unit_numel), weight_stack.view(-1, unit_numel)
        torch.unbind_copy(grad_stack, 0, out=grads[chunk])


def scale_units_(
    grads: list[Tensor], weights: list[Tensor], coefficient: UnitCoefficient, params: tuple[Tensor, ...]
) -> tuple[Tensor, int]:
    """``G_u ← G_u · c_u`` with ``c_u = coefficient(‖G_u‖, ‖W_u‖, *params)`` for every unit (see
    :func:`unit_norms`) of every grad; returns ``[Σ‖G_u‖², Σ(c_u‖G_u‖)², #{c_u < 1}]`` (1-D, accumulation
    dtype) and the number of units.

    ``grads`` and ``weights`` pair up and share one device and dtype. Non-empty tensors of at most
    ``STACK_NUMEL / 4`` elements (and 1/(8 · MEMORY_SHARE) of all) that share their shape with others are
    clipped on stacks of that shape; every other tensor alone.
    """
    total = sum(g.numel() for g in grads)
    compile_ = total >= COMPILE_MIN_NUMEL
    stack_numel = max(min(STACK_NUMEL, total // (2 * MEMORY_SHARE)), 1)
    alone, stacked = _stack_groups(grads, stack_numel)
    parts = []
    units = 0
    for i in alone:
        rows, weight_rows = _as_units(grads[i], weights[i])
        parts.append(
            unit_sums(*_run(_scale_rows_, _scale_rows_, compile_, rows, weight_rows, coefficient, params))
        )
        units += rows.shape[0]
    for indices in stacked:
        for rows, weight_rows in _stacks(
            [grads[i] for i in indices], [weights[i] for i in indices], stack_numel
        ):
            parts.append(
                unit_sums(*_run(_scale_rows_, _scale_rows_, compile_, rows, weight_rows, coefficient, params))
            )
            units += rows.shape[0]
    if not parts:
        return torch.zeros(3, dtype=accumulation_dtype(grads[0].dtype), device=grads[0].device), units
    return torch.stack([torch.stack(values).sum() for values in zip(*parts, strict=True)]), units


def _stack_groups(grads: list[Tensor], stack_numel: int) -> tuple[list[int], list[list[int]]]:
    """The indices of the grads clipped alone, and those of each shape clipped on stacks: non-empty grads
    of at most ``stack_numel / 4`` elements that share their shape with others."""
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    alone = []
    for i, grad in enumerate(grads):
        if 0 < grad.numel() * 4 <= stack_numel:
            by_shape[grad.shape].append(i)
        else:
            alone.append(i)
    alone += [indices[0] for indices in by_shape.values() if len(indices) == 1]
    return alone, [indices for indices in by_shape.values() if len(indices) > 1]
