"""The local pieces of (possibly sharded) parameters, and the reductions that make their norms global.

- One process, DDP, or FSDP1 ``NO_SHARD``: every rank holds whole, identical grads; nothing is reduced.
- FSDP2 (``fully_shard``): parameters and grads are DTensors sharded on dim 0 of a 1-D mesh (one mesh or
  one per ``fully_shard`` call, over one process group); rules work on ``to_local()`` views and sums are
  all-reduced over that group. 2-D meshes (hybrid sharding, tensor parallelism) are refused.
- FSDP1 (``FullyShardedDataParallel``): each rank holds a flat 1-D slice of every parameter; sums are
  all-reduced over the wrapper's process group, which only the module knows: FSDP1 parameters passed
  without it are refused. AGC needs whole units and is refused there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradclip_algo.norms import power_sum, root


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


@dataclass(frozen=True)
class Shards:
    """Local weights and grads (views: in-place changes reach the real grads) and how they are split.

    ``split[i]`` says tensor ``i`` is spread over the ranks of ``group``: its sums need an all-reduce.
    ``units_whole[i]`` says every AGC unit of tensor ``i`` (row, filter, or the whole 0-D/1-D tensor) lies
    on this rank.
    """

    params: list[Tensor]
    grads: list[Tensor]
    split: list[bool]
    units_whole: list[bool]
    group: dist.ProcessGroup | None = None
    layout: str = "local"  # "local" (one process or DDP), "fsdp1" or "fsdp2"
    home: torch.device | None = None  # the device of a rank that holds no grads of its own
    _norms: dict[float, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.grads[0].device if self.grads else (self.home or torch.device("cpu"))

    @functools.cached_property
    def _split_mask(self) -> Tensor:
        return torch.tensor(self.split, dtype=torch.bool).to(self.device, non_blocking=True)

    def sum_over_ranks_(self, tensor: Tensor) -> Tensor:
        """All-reduce (sum) ``tensor`` in place over the ranks the grads are split across."""
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def tensor_totals(self, values: Tensor) -> Tensor:
        """Per-tensor local sums (aligned with ``grads``) -> the sums over each whole tensor."""
        if self.group is None or not any(self.split):
            return values
        split = self._split_mask
        return torch.where(split, self.sum_over_ranks_(torch.where(split, values, 0.0)), values)

    def unit_totals_(self, index: int, squares: Tensor) -> Tensor:
        """Per-unit sums of squares of tensor ``index`` (whose units are spread over the ranks) summed
        over those ranks, in place."""
        return self.sum_over_ranks_(squares)

    def total(self, values: Tensor, maximum: bool = False, partial: Sequence[bool] | None = None) -> Tensor:
        """Sum (or max) over the whole model of per-tensor values aligned with ``grads``, same on every rank.

        Values flagged in ``partial`` (default: ``split``) are this rank's share and get all-reduced;
        the others are whole and counted once.
        """
        if maximum:
            result = values.max() if values.numel() else values.new_zeros(())
            if self.group is not None:
                dist.all_reduce(result, op=dist.ReduceOp.MAX, group=self.group)
            return result
        if self.group is None:
            return values.sum()
        mask = (
            self._split_mask
            if partial is None
            else torch.tensor(partial, dtype=torch.bool).to(self.device, non_blocking=True)
        )
        return self.sum_over_ranks_(torch.where(mask, values, 0).sum()) + torch.where(mask, 0, values).sum()

    def global_norm(self, norm_type: float = 2.0) -> Tensor:
        """The p-norm of the whole (unsharded) grads (fp32, 0-d).

        Computed once per ``norm_type`` and kept: a spike check and the rule after it share one read pass.
        The grads must not change in between (rules change them only after taking their norm).
        """
        if norm_type not in self._norms:
            self._norms[norm_type] = self._global_norm(norm_type)
        return self._norms[norm_type]

    def _global_norm(self, norm_type: float) -> Tensor:
        if self.group is None:
            return root(power_sum(self.grads, norm_type, self.device), norm_type)
        parts = [
            power_sum(
                [g for g, split in zip(self.grads, self.split, strict=True) if split == is_split],
                norm_type,
                self.device,
            )
            for is_split in (True, False)
        ]
        return root(self.total(torch.stack(parts), math.isinf(norm_type), partial=[True, False]), norm_type)


def _without_padding(tensor: Tensor, param: Tensor) -> Tensor:
    """The local shard of an FSDP1 ``FlatParameter`` (``use_orig_params=False``) less the zeros padding its
    end (so element counts are those of the real parameters); other tensors as they are."""
    padded = getattr(param, "_shard_numel_padded", 0)
    return tensor[: tensor.numel() - padded] if padded else tensor


def local_shards(
    params: Sequence[Tensor], module: nn.Module | None = None, grads: Sequence[Tensor] | None = None
) -> Shards:
    """The :class:`Shards` of ``params`` (all with grads); ``module`` is needed to recognise FSDP1.

    ``grads``: the params' ``.grad`` where the caller has read them already.
    """
    if not (dist.is_available() and dist.is_initialized()):  # no process group: no FSDP, no DTensor
        return _whole(params, grads)
    fsdp1 = _fsdp1_modules(module)
    if fsdp1:
        groups = {id(m.process_group): m.process_group for m in fsdp1}
        if len(groups) != 1:
            raise ValueError(
                "parameters: FSDP1 modules with different process groups (hybrid sharding) are not "
                "supported; use FULL_SHARD or SHARD_GRAD_OP with one process group, or FSDP2"
            )
        return Shards(
            params=[_without_padding(p.detach(), p) for p in params],
            grads=[_without_padding(p.grad, p) for p in params],
            split=[True] * len(params),
            units_whole=[False] * len(params),
            group=next(iter(groups.values())),
            layout="fsdp1",
            home=next(fsdp1[0].parameters()).device,
        )
    if module is None and any(getattr(p, "_fsdp_flattened", False) for p in params):  # FSDP1 marks its params
        raise ValueError(
            "parameters: FSDP1 (FullyShardedDataParallel) parameters were passed without their module; pass "
            "the wrapped module itself, so that norms are summed over its process group"
        )
    dtensor = _dtensor_type()
    if dtensor is None or not any(issubclass(kind, dtensor) for kind in {type(p) for p in params}):
        return _whole(params, grads)
    return _dtensor_shards(params, dtensor)


def _whole(params: Sequence[Tensor], grads: Sequence[Tensor] | None) -> Shards:
    """The :class:`Shards` of whole tensors (one process, DDP); params are read under ``no_grad``."""
    n = len(params)
    grads = [p.grad for p in params] if grads is None else list(grads)
    return Shards(list(params), grads, [False] * n, [True] * n)


def _dtensor_shards(params: Sequence[Tensor], dtensor: type) -> Shards:
    from torch.distributed.tensor import Replicate, Shard

    weights, grads, split, units_whole, groups = [], [], [], [], {}
    for param in params:
        if not isinstance(param, dtensor):
            weights.append(param.detach())
            grads.append(param.grad)
            split.append(False)
            units_whole.append(True)
            continue
        mesh = param.device_mesh
        if mesh.ndim != 1 or any(not isinstance(p, (Shard, Replicate)) for p in param.placements):
            raise ValueError(
                f"parameters: DTensor placements {param.placements} on a {mesh.ndim}-D mesh are not "
                "supported (hybrid sharding, tensor parallelism); use FSDP2 (fully_shard) on a 1-D mesh"
            )
        placement = param.placements[0]
        is_split = isinstance(placement, Shard) and mesh.size() > 1
        if is_split:  # separate fully_shard calls make separate meshes over the same process group
            group = mesh.get_group()
            groups[id(group)] = group
        weights.append(param.detach().to_local())
        grads.append(param.grad.to_local())
        split.append(is_split)
        # Shard(0) keeps each row/filter on one rank; a 0-D/1-D tensor is one unit spread over all of them
        units_whole.append(not is_split or (placement.dim == 0 and param.ndim >= 2))
    if len(groups) > 1:
        raise ValueError(
            "parameters: DTensors sharded over different process groups cannot be clipped together"
        )
    group = next(iter(groups.values()), None)
    return Shards(weights, grads, split, units_whole, group, "fsdp2" if group is not None else "local")
