"""Folding the clipping into the optimizer's own pass over the grads: the clipping coefficient ``c`` becomes
the optimizer's ``grad_scale`` (``1 / c``) and a skipped step its ``found_inf``.

torch's fused optimizers (``Adam``, ``AdamW``, ``SGD`` with ``fused=True``, on CPU and CUDA; any optimizer
with ``_step_supports_amp_scaling``) read two optional tensors in ``step()``, the ones ``GradScaler``
sets: every grad is divided by ``optimizer.grad_scale`` inside the update kernel, and ``found_inf = 1``
skips the update on the device (weights, moments and step counts stay bitwise as they were). Clipping by
a global norm is then one read of the grads (their norm) instead of two reads and a write (the kernel
writes the divided grads back as it updates), and a skip needs no host sync.

The contract, for the norm-based types (``norm``, ``quantile``, ``zscore``) and for skipping
(``nonfinite='skip'``, ``skip_spikes``) of any type:

- The factor and the skip flag are handed to the optimizer's **next** ``step()``: the clipping call sets
  ``grad_scale`` and ``found_inf`` (also inside a ``step(closure)``, the way Composer's Trainer steps) and a
  step post-hook removes them; a later call replaces what a step that never ran was handed.
- Between clipping and ``step()``, ``.grad`` holds the **unclipped** grads; the fused kernel writes the
  clipped ones (``g / grad_scale``) back into ``.grad`` during ``step()``. A skipped step leaves the grads
  in place (not ``None``). ``ClipStats`` reports the same norms as without folding.
- A ``GradScaler`` is never overridden. Where its attributes are already set when clipping runs (a
  scaler stepping with a closure), nothing is folded: the grads are rescaled. Where the scaler steps
  after clipping, it multiplies its scale into our ``grad_scale`` (torch >= 2.4) and replaces
  ``found_inf`` with its own; a step pre-hook then falls back for a skip by setting the optimizer's grads
  to ``None`` (a host sync).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

Optimizers = Sequence[Optimizer]


def supports_folding(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads ``grad_scale`` and ``found_inf`` (torch's fused optimizers)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def check_fold_into(field: str, value: Any) -> tuple[Optimizer, ...]:
    """``value`` (``None``, an optimizer or a sequence of them) as a tuple; ``TypeError`` otherwise."""
    if value is None:
        return ()
    if isinstance(value, Optimizer):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(item, Optimizer) for item in value):
        return tuple(value)
    raise TypeError(
        f"{field}: expected a torch.optim.Optimizer (e.g. AdamW(..., fused=True)), a list of them or None, "
        f"got {value!r}"
    )


def _params_with_grads(optimizers: Optimizers) -> set[int]:
    return {
        id(param)
        for optimizer in optimizers
        for group in optimizer.param_groups
        for param in group["params"]
        if param.grad is not None
    }


@dataclass(frozen=True)
class FoldPlan:
    """What one clipping call hands to the optimizers: the factor, the skip flag, both or neither.

    Each is exact only when the optimizers step exactly the tensors it concerns: the factor, the grads the
    rule clips, each contiguous; a skip, every grad the call would otherwise drop. A skip also needs state for every
    parameter: a fused step that ``found_inf`` skips still creates the state of a parameter stepped for
    the first time, which an unfolded skip (grads set to ``None``) does not.
    """

    optimizers: tuple[Optimizer, ...] = ()
    factor: bool = False
    skip: bool = False
    why_not: str = ""

    @classmethod
    def make(
        cls, optimizers: Optimizers, clipped: Sequence[Tensor], with_grads: Sequence[Tensor], local: bool
    ) -> FoldPlan:
        """The plan for ``optimizers`` when the rule clips the grads of ``clipped`` and a skip would drop
        those of ``with_grads``; ``local``: every grad is a plain tensor (no DTensor)."""
        if not optimizers:
            return cls()
        unsupported = [type(opt).__name__ for opt in optimizers if not supports_folding(opt)]
        if unsupported:
            return cls(why_not=f"{', '.join(unsupported)} reads no grad_scale/found_inf (use fused=True)")
        if not local:
            return cls(why_not="the grads are DTensors")
        if any(map(attributes_taken, optimizers)):
            return cls(why_not="its grad_scale/found_inf are already set (by a GradScaler)")
        stepped = _params_with_grads(optimizers)
        # torch's fused kernels read a grad's storage as if it were contiguous: a strided grad (a view) is
        # stepped wrongly either way, and differently once divided inside the kernel
        dense = all(param.grad is not None and param.grad.is_contiguous() for param in clipped)
        factor = dense and stepped == {id(param) for param in clipped}
        skip = stepped == {id(param) for param in with_grads} and all(
            param in opt.state for opt in optimizers for param in _own(opt, with_grads)
        )
        why_not = (
            ""
            if factor
            else "a grad is not contiguous"
            if not dense
            else "the optimizers do not step exactly the clipped parameters"
        )
        return cls(tuple(optimizers), factor, skip, why_not)


def _own(optimizer: Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    ids = {id(param) for group in optimizer.param_groups for param in group["params"]}
    return [param for param in params if id(param) in ids]


ATTRIBUTES = ("grad_scale", "found_inf")


class _StepHooks:
    """The attributes this library set on one optimizer for its next ``step()``, and the step hooks that
    remove them afterwards (or fall back where a ``GradScaler`` replaced ``found_inf``)."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.owned: dict[str, Tensor] = {}
        optimizer.register_step_pre_hook(self.before_step)
        optimizer.register_step_post_hook(self.after_step)

    def foreign(self, optimizer: Optimizer) -> bool:
        """Whether ``grad_scale`` or ``found_inf`` is set by someone else (a GradScaler inside a closure)."""
        return any(
            hasattr(optimizer, name) and getattr(optimizer, name) is not self.owned.get(name)
            for name in ATTRIBUTES
        )

    def hand_over(self, optimizer: Optimizer, attributes: dict[str, Tensor]) -> None:
        self.release(optimizer)
        for name, value in attributes.items():
            setattr(optimizer, name, value)
        self.owned = attributes

    def before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """A GradScaler's ``step()`` keeps (or multiplies into) our ``grad_scale`` but replaces
        ``found_inf``: a skip then falls back to dropping the grads (a host sync), and the scaler removes
        the attributes after the step."""
        if not self.foreign(optimizer):
            return
        skip = self.owned.get("found_inf")
        if skip is not None and bool(skip):
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        self.owned = {}

    def after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.release(optimizer)

    def release(self, optimizer: Optimizer) -> None:
        """Remove the attributes this library set that are still there (left by a step that never ran)."""
        for name, value in self.owned.items():
            if getattr(optimizer, name, None) is value:
                delattr(optimizer, name)
        self.owned = {}


_HOOKS: weakref.WeakKeyDictionary[Optimizer, _StepHooks] = weakref.WeakKeyDictionary()


def attributes_taken(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.grad_scale`` or ``found_inf`` is already set by someone else."""
    hooks = _HOOKS.get(optimizer)
    if hooks is None:
        return any(hasattr(optimizer, name) for name in ATTRIBUTES)
    return hooks.foreign(optimizer)


def hand_to_step(optimizers: Optimizers, coefficient: Tensor | None, skip: Tensor | None) -> None:
    """Hand the clipping ``coefficient`` (0-d) and ``skip`` flag (0-d bool), each or ``None``, to the next
    ``step()`` of every optimizer in ``optimizers`` as ``grad_scale = 1 / coefficient`` and ``found_inf``
    (float32, on the coefficient's or flag's device), in place of what an earlier call handed to a step
    that never ran. No host sync."""
    attributes = {}
    if coefficient is not None:
        attributes["grad_scale"] = coefficient.reciprocal().to(torch.float32)
    if skip is not None:
        attributes["found_inf"] = skip.to(torch.float32)
    for optimizer in optimizers:
        hooks = _HOOKS.get(optimizer)
        if hooks is None:
            if not attributes:
                continue
            hooks = _HOOKS[optimizer] = _StepHooks(optimizer)
        hooks.hand_over(optimizer, attributes)
