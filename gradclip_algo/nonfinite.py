"""What to do when a gradient holds inf or NaN, decided the same way on every rank."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from gradclip_algo.norms import group_by_device_and_dtype

NONFINITE_MODES = ("propagate", "error", "skip", "zero")
"""``propagate`` (default): clip as torch does, no check, no host sync; inf/NaN reach the optimizer and
show in ``ClipStats.grad_norm``. It is the default because checking costs a host sync every step, and
because under fp16 AMP the GradScaler already skips such steps. ``error``: raise
:class:`NonFiniteGradError` naming the first parameter with a non-finite grad. ``skip``: set every grad to
``None`` so ``optimizer.step()`` leaves weights and optimizer state untouched. ``error`` and ``skip`` sync
once per call, and under ``torch.distributed`` all ranks of the default process group take the same
decision (one all-reduce of a flag). ``zero``: replace inf/NaN elements by 0 and clip the rest (no sync,
one extra pass; each rank repairs its own grads)."""


class NonFiniteGradError(RuntimeError):
    """A gradient holds inf or NaN and ``nonfinite='error'`` was asked for."""

    def __init__(self, message: str, param_name: str | None) -> None:
        super().__init__(message)
        self.param_name = param_name


def zero_nonfinite_(grads: list[Tensor]) -> None:
    """Replace every inf and NaN grad element by 0, in place."""
    for grad in grads:
        grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def nonfinite_flags(grads: list[Tensor], device: torch.device) -> Tensor:
    """Bool tensor on ``device``: entry ``i`` is True where ``grads[i]`` holds inf or NaN.

    ``max|g|`` is inf or NaN exactly then (a max cannot overflow, unlike a sum of squares); one foreach
    kernel per device and dtype. Empty tensors (a rank's empty shard) are finite.
    """
    flags = torch.zeros(len(grads), dtype=torch.bool, device=device)
    for indices in group_by_device_and_dtype(grads).values():
        nonempty = [i for i in indices if grads[i].numel()]
        if nonempty:
            maxima = torch.stack(torch._foreach_norm([grads[i] for i in nonempty], math.inf))
            flags[torch.tensor(nonempty, device=device)] = ~torch.isfinite(maxima).to(device)
    return flags


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def nonfinite_on_any_rank(grads: list[Tensor], device: torch.device) -> bool:
    """Whether a grad on any rank of the default process group holds inf or NaN (one all-reduce, one sync).

    Every rank gets the same answer, so every rank skips or raises together even when only one rank's
    grads went bad (a fault after DDP's all-reduce, or a shard that lives on one rank).
    """
    flag = nonfinite_flags(grads, device).any().to(torch.int32).reshape(1)
    if _world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def _in_flat_parameter(name: str, param: Tensor, grad: Tensor) -> str:
    """For an FSDP1 ``FlatParameter`` (``use_orig_params=False``), the original parameter whose piece of the
    local shard ``grad`` is non-finite; ``name`` for any other tensor."""
    fqns, infos = getattr(param, "_fqns", None), getattr(param, "_shard_param_infos", None)
    if fqns is None or infos is None:
        return name
    prefix = name.removesuffix("_flat_param")
    for fqn, info in zip(fqns, infos, strict=True):
        if info.in_shard:
            piece = grad[info.offset_in_shard : info.offset_in_shard + info.numel_in_shard]
            if not bool(torch.isfinite(piece).all()):
                return prefix + fqn
    return name


def _first_local(named_params: Sequence[tuple[str | None, Tensor]], grads: Sequence[Tensor]) -> str | None:
    for index, ((name, param), grad) in enumerate(zip(named_params, grads, strict=True)):
        if grad.numel() and not bool(torch.isfinite(grad).all()):
            return _in_flat_parameter(name or f"parameter #{index}", param, grad)
    return None


def nonfinite_error(
    named_params: Sequence[tuple[str | None, Tensor]], grads: Sequence[Tensor]
) -> NonFiniteGradError:
    """The error naming the first parameter whose (local) grad in ``grads`` holds inf or NaN.

    Syncs; under ``torch.distributed`` it is a collective (each rank's first name is gathered) that builds
    the same error, naming the parameter and the first rank that holds one, on every rank.
    """
    name = _first_local(named_params, grads)
    where = ""
    world_size = _world_size()
    if world_size > 1:
        names: list[str | None] = [None] * world_size
        dist.all_gather_object(names, name)
        rank, name = next(((r, n) for r, n in enumerate(names) if n is not None), (None, None))
        where = "" if rank is None else f" on rank {rank}"
    return NonFiniteGradError(f"non-finite gradient (inf or NaN) in {name}{where}", name)
