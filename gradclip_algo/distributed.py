"""The local pieces of (possibly sharded) grads, and the reductions that make their sums model-wide.

- One process, DDP, or FSDP1 ``NO_SHARD``: every rank holds whole, identical grads; nothing is reduced.
- DTensor grads (FSDP2 ``fully_shard``, tensor parallelism, SequenceParallel, FSDP2 + TP on a 2-D mesh,
  HSDP ``(Replicate, Shard(0))``, meshes of any dimension): each grad is read by its OWN placements. A
  ``Partial`` grad (each rank holds a summand, e.g. a SequenceParallel LayerNorm's weight, or a
  ``Replicate`` parameter fed batch-sharded DTensor inputs) is first reduced: it is redistributed to its
  parameter's placements (``Replicate`` where the parameter's own is not a plain ``Shard``/``Replicate``)
  and assigned back as ``param.grad``, a new DTensor holding the same logical values. A grad whose
  placements differ from its parameter's in any other way is redistributed the same way, so that the
  local grad and the local weight cover the same elements. Then a sum over a tensor is reduced over
  exactly the mesh dims that ``Shard``/``_StridedShard`` it (one all-reduce per process group), never over
  the ``Replicate`` ones.
- FSDP1 (``FullyShardedDataParallel``): each rank holds a flat 1-D slice of every parameter; sums are
  all-reduced over the wrapper's process group, which only the module knows: FSDP1 parameters passed
  without it are refused. With ``use_orig_params=True`` a rank may hold no piece of a parameter; the lists
  get an empty placeholder for it (agreed over the group), so that per-tensor vectors have the same length
  on every rank. AGC needs whole units and is refused there (by the rule).
- Pipeline stages: ``stages`` (``process_group=`` of the clipper) is the group of ranks across which the
  model's parameters are split into stages. Model-wide totals (norms, statistics) are summed (max for the
  inf-norm) over it after each stage's own reductions, as torchtitan does for its pipeline mesh.

Every collective here has the same shape on every rank of its group by construction: its length is a
count of parameters, of ways of being split or of units, all read from the model's structure (the same on
every rank of a stage), never from which local pieces happen to be non-empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradclip_algo.norms import power_sum, root
from gradclip_algo.validation import shown

Partial = Sequence[bool | int] | bool | None
"""Per value of :meth:`Shards.total`: ``False``/0 whole, ``True`` this rank's share (of the one way the
grads are split), or ``k`` >= 1 (a :attr:`Shards.reduction` id) this rank's share, split as way ``k``."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def _fsdp1_modules(module: nn.Module | None) -> list[nn.Module]:
    if module is None or not dist.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    return [
        m
        for m in module.modules()
        if isinstance(m, FullyShardedDataParallel) and m.sharding_strategy != ShardingStrategy.NO_SHARD
    ]


def check_process_group(field_name: str, value: Any) -> Any:
    """``None`` or a ``torch.distributed`` ``ProcessGroup`` (the group of pipeline stages).

    A YAML file cannot hold a process group: the option is for Python callers only.
    """
    if value is None:
        return None
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    raise TypeError(
        f"{field_name}: expected a torch.distributed ProcessGroup (the group of ranks across which the "
        f"model's parameters are split into pipeline stages) or None, got {shown(value)}; a YAML file cannot "
        f"hold a process group: pass {field_name}= from Python (GradientClipper, apply_gradient_clipping "
        "or GradClipAlgo)"
    )


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """Where the tensors of a collective over ``group`` must lie (a rank without grads has no other hint)."""
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True, eq=False)
class Shards:
    """Local weights and grads (views: in-place changes reach the real grads) and how they are split.

    - ``split[i]``: tensor ``i`` is spread over ranks: its sums need reductions.
    - ``units_whole[i]``: every AGC unit of tensor ``i`` (output row/filter of a 2+-D tensor, or the whole
      0-D/1-D tensor) lies whole on this rank.
    - ``reduction[i]``: 0 if tensor ``i`` is whole here, else ``k`` >= 1, the way it is split (the set of
      process groups its sums are all-reduced over). Sums of tensors with the same ``k`` may be added
      together before :meth:`total` (pass ``k`` in ``partial``); on one way of splitting (1-D meshes,
      FSDP1, TP alone) ``k`` is 1 for every split tensor and ``True`` says the same.
    - ``unit_reduction[i]``: the same for per-unit values of tensor ``i`` (AGC statistics) once
      :meth:`unit_totals_` has summed its split units: the ways that split its units are left out.
    - ``layout``: ``"local"`` (one process, DDP, or nothing split), ``"fsdp1"`` or ``"fsdp2"`` (DTensor
      grads: FSDP2, TP, HSDP, any mesh).
    """

    params: list[Tensor]
    grads: list[Tensor]
    split: list[bool]
    units_whole: list[bool]
    layout: str = "local"
    home: torch.device | None = None  # the device of a rank that holds no grads of its own
    reduction: list[int] = field(default_factory=list)
    unit_reduction: list[int] = field(default_factory=list)
    ways: list[tuple[dist.ProcessGroup, ...]] = field(default_factory=list)  # way k: ways[k - 1]
    unit_groups: list[tuple[dist.ProcessGroup, ...]] = field(default_factory=list)  # per tensor
    stages: dist.ProcessGroup | None = None  # pipeline stages
    _norms: dict[float, Tensor] = field(default_factory=dict, init=False, repr=False)
    _groups: list[tuple[dist.ProcessGroup, list[bool]]] = field(default_factory=list, init=False, repr=False)
    """Every process group of every way, in the order of the model's structure (the same order on every
    rank), each with which ways it belongs to (a plain field: ``torch.compile`` traces through it)."""

    def __post_init__(self) -> None:
        if not self.reduction:
            object.__setattr__(self, "reduction", [int(s) for s in self.split])
        if not self.unit_reduction:
            object.__setattr__(self, "unit_reduction", list(self.reduction))
        if not self.unit_groups:
            object.__setattr__(self, "unit_groups", [()] * len(self.grads))
        found: dict[int, tuple[dist.ProcessGroup, list[bool]]] = {}
        for k, way in enumerate(self.ways):
            for group in way:
                entry = found.setdefault(id(group), (group, [False] * len(self.ways)))
                entry[1][k] = True
        object.__setattr__(self, "_groups", list(found.values()))

    @property
    def device(self) -> torch.device:
        return self.grads[0].device if self.grads else (self.home or torch.device("cpu"))

    @property
    def group(self) -> dist.ProcessGroup | None:
        """A process group this rank reduces over (``None``: nothing is reduced, every sum is local)."""
        return next((group for way in self.ways for group in way), self.stages)

    # ---- reductions ---------------------------------------------------------------------------------

    def _ways_of(self, partial: Partial, count: int) -> list[int]:
        if partial is None:
            if count != len(self.grads):
                raise ValueError(
                    f"Shards.total: {count} values are not one per tensor ({len(self.grads)}); "
                    "pass partial= for per-part values"
                )
            return self.reduction
        if isinstance(partial, bool):
            return [self._single_way() if partial else 0] * count
        return [
            (self._single_way() if flag else 0) if isinstance(flag, bool) else int(flag) for flag in partial
        ]

    def _single_way(self) -> int:
        if len(self.ways) > 1:
            raise ValueError(
                "Shards.total: the grads are split in several ways (e.g. FSDP2 + TP on a 2-D mesh): "
                "partial=True is ambiguous; group values by Shards.reduction and pass those ids"
            )
        return len(self.ways)  # 1, or 0 when nothing is split

    def _sum_ways_(self, sums: Tensor) -> Tensor:
        """``sums[k - 1]`` (this rank's share of way ``k``) -> summed over the ranks that split way ``k``."""
        for group, members in self._groups:
            if all(members):
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
                continue
            mask = torch.tensor(members, device=sums.device).view(-1, *([1] * (sums.ndim - 1)))
            reduced = torch.where(mask, sums, 0)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
            sums = torch.where(mask, reduced, sums)
        return sums

    def _max_everywhere_(self, value: Tensor) -> Tensor:
        """The max over every rank of the stage and every stage; a NaN on any rank gives NaN everywhere
        (a MAX all-reduce may drop NaNs, so they travel as a flag beside the value)."""
        nan = value.isnan()
        packed = torch.stack([torch.where(nan, 0.0, value), nan.to(value.dtype)])
        for group in [group for group, _ in self._groups] + [self.stages] * (self.stages is not None):
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        return torch.where(packed[1] > 0, math.nan, packed[0])

    def total(self, values: Tensor, maximum: bool = False, partial: Partial = None) -> Tensor:
        """The model-wide sum (or max) of local values, the same on every rank.

        ``values``: one per tensor (aligned with ``grads``) or per part, along dim 0 (2-D values give one
        total per column). ``partial[i]`` (default: ``reduction``, for per-tensor values) says value ``i``
        is this rank's share of something split across ranks (``True``, or the way id ``k`` of
        :attr:`reduction`) and must be reduced; the rest (``False``/0) are whole and counted once.
        With pipeline stages, the result is also summed (max) over the stages.
        """
        values = values.to(self.device)
        if maximum:
            result = values.amax(0) if values.shape[0] else values.new_zeros(values.shape[1:])
            return self._max_everywhere_(result)
        ways = self._ways_of(partial, values.shape[0])
        if not any(ways):
            result = values.sum(0)
        else:
            index = torch.tensor(ways, device=values.device)
            by_way = values.new_zeros(len(self.ways) + 1, *values.shape[1:]).index_add_(0, index, values)
            result = by_way[0] + self._sum_ways_(by_way[1:]).sum(0)
        if self.stages is not None:
            dist.all_reduce(result, op=dist.ReduceOp.SUM, group=self.stages)
        return result

    def tensor_totals(self, values: Tensor) -> Tensor:
        """Per-tensor local sums (1-D, aligned with ``grads``) -> the sums over each whole tensor, reduced
        over exactly the ranks that split tensor ``i``; the same on every rank of the stage."""
        values = values.to(self.device)
        for group, members in self._groups:
            mask = torch.tensor([bool(k) and members[k - 1] for k in self.reduction], device=values.device)
            reduced = torch.where(mask, values, 0)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
            values = torch.where(mask, reduced, values)
        return values

    def unit_totals_(self, i: int | Sequence[int], squares: Tensor | Sequence[Tensor]) -> Any:
        """Local per-unit sums of squares of tensor ``i`` (shaped as ``vector_norm(local, dim=unit dims,
        keepdim=True) ** 2``) -> summed over the ranks that split those units, in place.

        ``i`` may be a list of tensor indices with ``squares`` a list of such tensors (the same index may
        repeat, e.g. for a grad and its weight): one all-reduce per process group for all of them.
        """
        if isinstance(i, int):
            return self.unit_totals_([i], [squares])[0]
        squares = list(squares)
        order: dict[int, tuple[dist.ProcessGroup, list[int]]] = {}
        for position, index in enumerate(i):
            for group in self.unit_groups[index]:
                order.setdefault(id(group), (group, []))[1].append(position)
        for group, positions in order.values():
            flat = torch.cat([squares[p].reshape(-1) for p in positions])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for p, part in zip(positions, flat.split([squares[p].numel() for p in positions]), strict=True):
                squares[p].copy_(part.view_as(squares[p]))
        return squares

    # ---- norms --------------------------------------------------------------------------------------

    def global_norm(self, norm_type: float = 2.0) -> Tensor:
        """The p-norm of the whole (unsharded) grads of the whole model (fp32, 0-d), the same on every rank.

        Computed once per ``norm_type`` and kept: a spike check and the rule after it share one read pass.
        The grads must not change in between (rules change them only after taking their norm).
        """
        if norm_type not in self._norms:
            self._norms[norm_type] = self._global_norm(norm_type)
        return self._norms[norm_type]

    def _global_norm(self, norm_type: float) -> Tensor:
        if not self.ways and self.stages is None:
            return root(power_sum(self.grads, norm_type, self.device), norm_type)
        if math.isinf(norm_type):
            return self._max_everywhere_(power_sum(self.grads, norm_type, self.device))
        parts = [
            power_sum(
                [g for g, k in zip(self.grads, self.reduction, strict=True) if k == way],
                norm_type,
                self.device,
            )
            for way in range(len(self.ways) + 1)
        ]
        return root(self.total(torch.stack(parts), partial=list(range(len(parts)))), norm_type)


# ---- building the Shards ----------------------------------------------------------------------------


def _without_padding(tensor: Tensor, param: Tensor) -> Tensor:
    """The local shard of an FSDP1 ``FlatParameter`` (``use_orig_params=False``) less the zeros padding its
    end (so element counts are those of the real parameters); other tensors as they are."""
    padded = getattr(param, "_shard_numel_padded", 0)
    return tensor[: tensor.numel() - padded] if padded else tensor


def local_shards(
    params: Sequence[Tensor],
    module: nn.Module | None = None,
    grads: Sequence[Tensor] | None = None,
    stages: dist.ProcessGroup | None = None,
) -> Shards:
    """The :class:`Shards` of ``params`` (all with grads); ``module`` is needed to recognise FSDP1.

    ``grads``: the params' ``.grad`` where the caller has read them already. ``stages``: the group of
    pipeline stages (``process_group=``), or ``None``.
    """
    if not (dist.is_available() and dist.is_initialized()):  # no process group: no FSDP, no DTensor
        return _whole(params, grads)
    if stages is not None and dist.get_world_size(stages) == 1:
        stages = None
    fsdp1 = _fsdp1_modules(module)
    if fsdp1:
        return _fsdp1_shards(params, module, fsdp1, stages)
    if module is None and any(getattr(p, "_fsdp_flattened", False) for p in params):  # FSDP1 marks its params
        raise ValueError(
            "parameters: FSDP1 (FullyShardedDataParallel) parameters were passed without their module; pass "
            "the wrapped module itself, so that norms are summed over its process group"
        )
    dtensor = _dtensor_type()
    if dtensor is None or not any(issubclass(kind, dtensor) for kind in {type(p) for p in params}):
        return _whole(params, grads, stages)
    return _dtensor_shards(params, dtensor, stages)


def _whole(params: Sequence[Tensor], grads: Sequence[Tensor] | None, stages: Any = None) -> Shards:
    """The :class:`Shards` of whole tensors (one process, DDP); params are read under ``no_grad``."""
    n = len(params)
    grads = [p.grad for p in params] if grads is None else list(grads)
    home = None if stages is None or grads else _group_device(stages)
    split = [False] * n
    return Shards(
        list(params),
        grads,
        split,
        [True] * n,
        home=home,
        reduction=[0] * n,
        unit_groups=[()] * n,
        stages=stages,
    )


def _fsdp1_shards(params: Sequence[Tensor], module: nn.Module, fsdp1: list[nn.Module], stages: Any) -> Shards:
    groups = {id(m.process_group): m.process_group for m in fsdp1}
    if len(groups) != 1:
        raise ValueError(
            "parameters: FSDP1 modules with different process groups (hybrid sharding) are not "
            "supported; use FULL_SHARD or SHARD_GRAD_OP with one process group, or FSDP2"
        )
    group = next(iter(groups.values()))
    home = next(fsdp1[0].parameters()).device
    params = list(params)
    if any(getattr(m, "_use_orig_params", False) for m in fsdp1):
        params = _union_over_ranks(params, module, group, home)
    grads = [
        _without_padding(p.grad, p) if p.grad is not None else torch.empty(0, dtype=p.dtype, device=home)
        for p in params
    ]
    n = len(params)
    return Shards(
        params=[_without_padding(p.detach(), p) for p in params],
        grads=grads,
        split=[True] * n,
        units_whole=[False] * n,
        layout="fsdp1",
        home=home,
        ways=[(group,)],
        unit_groups=[(group,)] * n,
        stages=stages,
    )


def _union_over_ranks(
    params: list[Tensor], module: nn.Module, group: dist.ProcessGroup, device: torch.device
) -> list[Tensor]:
    """FSDP1 ``use_orig_params=True``: a rank holds no grad for a parameter that lies wholly on other
    ranks. The parameters clipped on ANY rank, in the module's order (one all-reduce of a flag per
    parameter of the module: the same length everywhere); those without a local grad then get an empty one.
    """
    from gradclip_algo.parameters import collect

    everything = [param for _, param in collect(module, names=False)]
    passed = {id(p) for p in params}
    flags = torch.tensor([id(p) in passed for p in everything], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [p for p, flag in zip(everything, flags.tolist(), strict=True) if flag]


def _sharded_dim(placement: Any) -> int | None:
    """The tensor dim a ``Shard``/``_StridedShard`` placement splits; ``None`` for other placements."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return placement.dim if isinstance(placement, (Shard, _StridedShard)) else None


def _resolved_grad(param: Any, grad: Any) -> Any:
    """``grad`` with its parameter's placements: a ``Partial`` grad is reduced (where the parameter's own
    placement is not a plain ``Shard``/``Replicate``, to ``Replicate``); assigned back as ``param.grad``."""
    if grad.placements == param.placements:
        return grad
    from torch.distributed.tensor import Replicate, Shard

    target = [
        p if type(p) in (Shard, Replicate) or not (g.is_partial() or p.is_partial()) else Replicate()
        for p, g in zip(param.placements, grad.placements, strict=True)
    ]
    resolved = grad.redistribute(grad.device_mesh, target)
    param.grad = resolved
    return resolved


class _Ways:
    """The reduction ways of one call's DTensor grads: way ``k`` (from 1) reduces over ``ways[k - 1]``, a
    tuple of groups; way 0 reduces nothing. There is one group object per set of ranks: separate meshes
    over the same ranks (one per fully_shard call, a submesh and its root's dim) then reduce together,
    once."""

    def __init__(self) -> None:
        self.ways: list[tuple[dist.ProcessGroup, ...]] = []
        self._ids: dict[tuple[int, ...], int] = {}
        self._mesh_groups: dict[int, list[dist.ProcessGroup]] = {}
        self._by_ranks: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def _canonical(self, group: dist.ProcessGroup) -> dist.ProcessGroup:
        return self._by_ranks.setdefault(tuple(dist.get_process_group_ranks(group)), group)

    def mesh_groups(self, mesh: Any) -> list[dist.ProcessGroup]:
        """The (canonical) group of each dim of the device ``mesh``."""
        if id(mesh) not in self._mesh_groups:
            self._mesh_groups[id(mesh)] = [self._canonical(mesh.get_group(d)) for d in range(mesh.ndim)]
        return self._mesh_groups[id(mesh)]

    def way_of(self, groups: tuple[dist.ProcessGroup, ...]) -> int:
        """The way that reduces over ``groups`` (0 for none), added where new."""
        if not groups:
            return 0
        key = tuple(sorted(id(g) for g in groups))
        if key not in self._ids:
            self.ways.append(groups)
            self._ids[key] = len(self.ways)
        return self._ids[key]


def _split_by(
    grad: Any, by_dim: list[dist.ProcessGroup]
) -> tuple[list[dist.ProcessGroup], list[dist.ProcessGroup]]:
    """The groups (of ``by_dim``, one per mesh dim) across which the DTensor ``grad`` is split, and those of
    them that also split its AGC units (a split along a dim other than the first, or of a 0-D/1-D tensor)."""
    split_by, units_split_by = [], []
    for d, placement in enumerate(grad.placements):
        dim = _sharded_dim(placement)
        if dim is None or grad.device_mesh.size(d) == 1:
            continue
        split_by.append(by_dim[d])
        if grad.ndim < 2 or dim % grad.ndim != 0:
            units_split_by.append(by_dim[d])
    return split_by, units_split_by


def _dtensor_shards(params: Sequence[Tensor], dtensor: type, stages: Any) -> Shards:
    weights, grads, reduction, unit_reduction, unit_groups = [], [], [], [], []
    ways = _Ways()
    for param in params:
        if not isinstance(param, dtensor):
            weights.append(param.detach())
            grads.append(param.grad)
            reduction.append(0)
            unit_reduction.append(0)
            unit_groups.append(())
            continue
        grad = _resolved_grad(param, param.grad)
        split_by, units_split_by = _split_by(grad, ways.mesh_groups(grad.device_mesh))
        weights.append(param.detach().to_local())
        grads.append(grad.to_local())
        reduction.append(ways.way_of(tuple(split_by)))
        unit_groups.append(tuple(units_split_by))
        unit_reduction.append(ways.way_of(tuple(g for g in split_by if g not in units_split_by)))
    home = None if grads or stages is None else _group_device(stages)
    return Shards(
        weights,
        grads,
        split=[bool(k) for k in reduction],
        units_whole=[not groups for groups in unit_groups],
        layout="fsdp2" if ways.ways else "local",
        home=home,
        reduction=reduction,
        unit_reduction=unit_reduction,
        ways=ways.ways,
        unit_groups=unit_groups,
        stages=stages,
    )
