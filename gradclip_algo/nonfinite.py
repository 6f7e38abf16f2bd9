"""What to do when a gradient holds inf or NaN, decided the same way on every rank."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from gradclip_algo.distributed import Shards

NONFINITE_MODES = ("propagate", "error", "skip", "zero")
"""What the clipper does when a grad it clips holds inf or NaN.

- ``propagate`` (default): no check. Clipping goes on as torch's ``clip_grad_norm_`` does (a NaN makes the
  norm NaN and every clipped grad NaN; an inf gives zeros and NaNs); ``ClipStats.grad_norm`` shows it.
  It is the default because it is torch's and Composer's behaviour, because a check costs a host sync
  (and, across ranks, a collective) every step, and because under fp16 AMP the GradScaler already skips
  every step whose grads hold inf or NaN. Without fp16 AMP, NaN grads then reach the optimizer.
- ``error``: raise :class:`NonFiniteGradError` naming the first parameter (and rank) with such a grad,
  or saying that the total norm of finite grads overflowed (as torch's ``error_if_nonfinite`` raises
  then too); the grads are left as they were.
- ``skip``: set the grad of every parameter (excluded ones too) to ``None``, so ``optimizer.step()``
  leaves weights and optimizer state untouched; ``ClipStats.skipped`` is ``True``. Folded into a fused
  optimizer (``fold_into``), the skip becomes its ``found_inf`` instead, with no host sync
  (:mod:`gradclip_algo.folding`).
- ``zero``: replace inf/NaN elements by 0 and clip the rest as usual (one extra in-place pass, no sync).

``error`` and ``skip`` judge the global norm that the rule reports (computed once and shared with the
rule; L2 for the types that report L2), with one all-reduce of a flag over the default process group and
one host sync per call (none when the skip is folded): every rank takes the same decision, so every rank must call the clipper. ``zero``
is local to each rank (DDP grads are the same on every rank; a shard lives on one rank).
"""


class NonFiniteGradError(RuntimeError):
    """A gradient holds inf or NaN and ``nonfinite='error'`` was asked for."""

    def __init__(self, message: str, param_name: str | None) -> None:
        super().__init__(message)
        self.param_name = param_name


def zero_nonfinite_(grads: list[Tensor]) -> None:
    """Replace every inf and NaN grad element by 0, in place."""
    for grad in grads:
        grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


class NonfiniteCheck(NamedTuple):
    """What :func:`check_nonfinite_` decided; both ``None``: go on clipping."""

    skip: Tensor | None
    """The 0-d bool device flag of a folded skip, for the optimizers' ``found_inf``."""
    stop: Tensor | None
    """The non-finite global norm of a step to stop on the host: raise ('error') or drop the grads ('skip')."""


def check_nonfinite_(mode: str, shards: Shards, norm_type: float, fold_skip: bool) -> NonfiniteCheck:
    """Apply the :data:`NONFINITE_MODES` ``mode`` to ``shards``: 'zero' zeroes their inf/NaN elements;
    'error' and 'skip' judge their global ``norm_type`` norm, the same way on every rank (:func:`any_rank`).
    A 'skip' folded into the optimizers (``fold_skip``) stays on the device; otherwise the flag is read
    on the host (the one sync these modes need).
    """
    if mode == "zero":
        zero_nonfinite_(shards.grads)
    if mode not in ("error", "skip"):
        return NonfiniteCheck(None, None)
    norm = shards.global_norm(norm_type)
    nonfinite = any_rank(~torch.isfinite(norm))
    if mode == "skip" and fold_skip:
        return NonfiniteCheck(nonfinite, None)
    return NonfiniteCheck(None, norm if bool(nonfinite) else None)  # the host sync unless folded


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flag: Tensor) -> Tensor:
    """``flag`` (0-d bool) OR-ed over the ranks of the default process group, as a 0-d bool tensor (a
    collective when there are several ranks; no host sync).

    Every rank gets the same answer, so every rank skips or raises together even when only one rank's
    grads went bad (a fault after DDP's all-reduce, or a shard that lives on one rank).
    """
    if _world_size() == 1:
        return flag
    flag = flag.to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.reshape(()).to(torch.bool)


def on_any_rank(flag: Tensor) -> bool:
    """:func:`any_rank` read on the host (a sync)."""
    return bool(any_rank(flag))


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


def texts_from_every_rank(text: str | None, device: torch.device) -> list[str | None]:
    """``text`` from every rank of the default process group, in rank order (``None`` travels as "").

    Two all-gathers of UTF-8 bytes, sizes then padded bytes; unlike ``all_gather_object`` it needs no numpy.
    """
    world_size = _world_size()
    data = torch.tensor(list((text or "").encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    lengths = [int(size) for size in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [bytes(g[:n].tolist()).decode() or None for g, n in zip(gathered, lengths, strict=True)]


def nonfinite_error(
    named_params: Sequence[tuple[str | None, Tensor]], grads: Sequence[Tensor], norm: Tensor
) -> NonFiniteGradError:
    """The error naming the first parameter whose (local) grad in ``grads`` holds inf or NaN, or, where
    every element is finite, saying that their total ``norm`` overflowed its dtype.

    Syncs; under ``torch.distributed`` it is a collective (each rank's first name is gathered) that builds
    the same error, naming the parameter and the first rank that holds one, on every rank.
    """
    name = _first_local(named_params, grads)
    where = ""
    if _world_size() > 1:
        names = texts_from_every_rank(name, norm.device)
        rank, name = next(((r, n) for r, n in enumerate(names) if n is not None), (None, None))
        where = "" if rank is None else f" on rank {rank}"
    if name is None:
        return NonFiniteGradError(
            f"the total gradient norm is {float(norm)} although every gradient element is finite: it "
            f"overflows {norm.dtype}; lower the loss scale or learning rate, or clip in float64",
            None,
        )
    return NonFiniteGradError(f"non-finite gradient (inf or NaN) in {name}{where}", name)
