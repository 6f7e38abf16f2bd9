"""Folding the clipping into the optimizer's own pass over the grads: the clipping coefficient ``c`` becomes
the optimizer's ``grad_scale`` (``1 / c``) and a skipped step its ``found_inf``.

torch's fused optimizers (``Adam``, ``AdamW``, ``SGD`` with ``fused=True``, on CPU and CUDA; any optimizer
with ``_step_supports_amp_scaling``) read two optional tensors in ``step()``, the ones ``GradScaler``
sets: every grad is divided by ``optimizer.grad_scale`` inside the update kernel, which writes the divided
grads back, and ``found_inf = 1`` skips the update on the device (weights, moments and step counts stay as
they were). Clipping by a global norm is then one read of the grads (their norm) instead of two reads and
a write, and a skip needs no host sync.

**The contract: a folded run computes what the unfolded run computes.** The only observable difference is
that between the clipping call and ``step()``, ``.grad`` holds the unclipped grads (and, after a folded
skip, the grads stay in place where the unfolded skip sets them to ``None``). How it is kept:

- The clipping call only *records* the fold: the factor, the skip flag, and each grad it concerns with its
  ``_version`` counter. Nothing is set on the optimizer yet.
- At the step, as the last thing before the kernel (a step pre-hook; with ``step(closure)``, as Composer's
  Trainer calls it, right after the closure returns), the record is checked. Where every recorded grad is
  the same tensor at the same version, the optimizer steps exactly those grads, and neither
  ``grad_scale`` nor ``found_inf`` is set by anyone else, the attributes are set for this one step and a
  step post-hook removes them. Otherwise the clipping is applied the unfolded way, just before the kernel:
  the grads are multiplied by ``c`` and a skip sets them to ``None`` (reading the skip flag: a host sync).
  Since the grads are unchanged, this is the unfolded result.
- A grad replaced since the clip (``zero_grad()`` and a new backward: the factor is stale) is left alone,
  as the unfolded run would step it. A grad written in place since the clip (another clipper, an in-place
  edit, a further backward that accumulates) cannot be given the clipped result any more: the step (or the
  next clipping call on those grads) raises :class:`FoldError` before anything changes.
- Another clipping call of this library on the same grads (a second clipper, a clip after every
  microbatch) first applies their pending fold the unfolded way, so clips compose as they do unfolded.
- A fold is recorded only where a settle will come before the kernel: not from inside a ``step()`` that
  has begun, outside its closure (another pre-hook, or a step whose hooks were registered after it began;
  :func:`prepare_folding` registers them ahead). A step that raised after the fold was handed to it keeps
  no attributes beyond the next clipping call or step, which takes the fold back as pending.
- After a folded skip the grads stay in place. A second ``step()`` on them is skipped again; replacing
  them (``zero_grad()``, ``set_to_none=True`` by default) ends the skip. Where they are written in place
  instead (``zero_grad(set_to_none=False)``, a backward that accumulates), the skip flag is read (a host
  sync, the one cost of that loop) and, if the step was skipped, the next step raises
  :class:`FoldError`: the unfolded grads would have started from ``None``.

What is never folded (the call rescales or drops the grads itself, and the first such call of a clipper
warns): non-fused optimizers, DTensor grads, optimizers whose ``grad_scale``/``found_inf`` are already set
(a ``GradScaler`` stepping with a closure), parameters the optimizers step but the rule does not clip; the
factor of float64 grads (``grad_scale`` is float32), of strided grads (fused kernels read their storage as
if contiguous), of thresholds computed on the device (``quantile``, ``zscore``) and of fixed ones whose
``1 / c`` could overflow float32 (see :func:`factor_is_foldable`); a skip of a parameter without optimizer
state (a fused step that ``found_inf`` skips still creates it, and fused SGD leaves its momentum buffer
uninitialised).

A grad *replaced* by one computed from the unclipped grad between the clip and the step
(``p.grad = p.grad * 2``, an out-of-place accumulation under ``create_graph=True``) cannot be told from a
fresh grad: it is stepped as it is, as the one visible difference above implies.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradclip_algo.caller import warn_at_caller
from gradclip_algo.norms import scale_grads_
from gradclip_algo.parameters import Named
from gradclip_algo.validation import shown

Optimizers = Sequence[Optimizer]
ATTRIBUTES = ("grad_scale", "found_inf")
FLOAT32_MAX = torch.finfo(torch.float32).max
_STEP_WRAPPER = Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__
"""The code of the wrapper through which torch runs every ``optimizer.step()`` and its hooks."""


def _in_step(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` is on the call stack (reads the frames once)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER and frame.f_locals.get("self") is optimizer:
            return True
        frame = frame.f_back
    return False


class FoldError(RuntimeError):
    """A step whose folded grads were written after the clip: it cannot compute the clipped result, so it
    stops before anything changes."""


def supports_folding(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads ``grad_scale`` and ``found_inf`` (torch's fused optimizers)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def check_fold_into(field: str, value: Any) -> tuple[Optimizer, ...]:
    """``value`` (``None``, an optimizer or a sequence of them) as a tuple; ``TypeError`` otherwise."""
    if value is None:
        return ()
    if isinstance(value, Optimizer):
        return (value,)
    expected = (
        f"{field}: expected a torch.optim.Optimizer (e.g. AdamW(..., fused=True)), a list of them or None"
    )
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{expected}, got {shown(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, Optimizer):
            raise TypeError(f"{expected}, got {shown(item)} at index {index} of the {type(value).__name__}")
    return tuple(value)


def factor_is_foldable(threshold: float, norm_type: float) -> bool:
    """Whether ``1 / c`` is a finite float32 for every finite norm of non-float64 grads, with
    ``c = threshold / (norm + 1e-6)``.

    Power sums of such grads are float32, so a finite p-norm is at most ``FLOAT32_MAX ** (1/p)`` for
    p ≥ 1 (about 1.8e19 for p = 2) and ``FLOAT32_MAX`` for p < 1 or p = inf; ``1 / c`` then stays finite
    with a margin of 2 when ``threshold ≥ 2 · norm_max / FLOAT32_MAX``: any threshold above 1.1e-19 for the
    L2 norm, at least 2 for p = inf or p ≤ 1."""
    norm_max = FLOAT32_MAX if math.isinf(norm_type) or norm_type <= 1 else FLOAT32_MAX ** (1 / norm_type)
    return threshold >= 2 * norm_max / FLOAT32_MAX


def _stepped(optimizers: Optimizers) -> dict[int, Tensor]:
    return {
        id(param): param
        for optimizer in optimizers
        for group in optimizer.param_groups
        for param in group["params"]
        if param.grad is not None
    }


@dataclass(frozen=True)
class FoldPlan:
    """What one clipping call hands to the optimizers: the factor, the skip flag, both or neither, and why
    not where the factor is not folded."""

    optimizers: tuple[Optimizer, ...] = ()
    factor: bool = False
    skip: bool = False
    why_not: str = ""

    @classmethod
    def make(
        cls,
        optimizers: Optimizers,
        clipped: Sequence[Tensor],
        with_grads: Sequence[Tensor],
        local: bool,
        factor_why_not: str | None,
    ) -> FoldPlan:
        """The plan for ``optimizers`` when the rule clips the grads of ``clipped`` and a skip would drop
        those of ``with_grads``; ``local``: every grad is a plain tensor (no DTensor); ``factor_why_not``:
        ``None`` where the rule has no single factor, else why its factor cannot be folded at any norm
        (``""``: it can, see :func:`factor_is_foldable`)."""
        if not optimizers:
            return cls()
        unsupported = [type(opt).__name__ for opt in optimizers if not supports_folding(opt)]
        if unsupported:
            return cls(why_not=f"{', '.join(unsupported)} reads no grad_scale/found_inf (use fused=True)")
        if not local:
            return cls(why_not="the grads are DTensors")
        _register(optimizers)
        if not all(_LEDGERS[optimizer].can_take_fold() for optimizer in optimizers):
            return cls(why_not="the clip runs inside a step() (outside its closure) that has already begun")
        if any(hasattr(opt, name) for opt in optimizers for name in ATTRIBUTES):
            return cls(why_not="its grad_scale/found_inf are already set by other code (a GradScaler?)")
        stepped = _stepped(optimizers)
        # a skip found_inf leaves every parameter as it was only where its optimizer state exists (an
        # entry created by merely reading optimizer.state[p] is empty)
        skip = stepped.keys() == {id(param) for param in with_grads} and all(
            opt.state.get(param) for opt in optimizers for param in _own(opt, with_grads)
        )
        why_not = "" if factor_why_not is None else _factor_why_not(stepped, clipped) or factor_why_not
        return cls(tuple(optimizers), factor_why_not is not None and not why_not, skip, why_not)


NO_FOLD = FoldPlan()
"""The plan of a call with no optimizers to fold into."""


def _factor_why_not(stepped: dict[int, Tensor], clipped: Sequence[Tensor]) -> str:
    """Why the grads of ``clipped`` cannot take a factor folded into the step of ``stepped``."""
    grads = [param.grad for param in clipped]
    if stepped.keys() != {id(param) for param in clipped}:
        return "the optimizers do not step exactly the clipped parameters"
    if any(grad is None or grad.dtype == torch.float64 for grad in grads):
        return "a grad is float64 (grad_scale is float32)"
    # torch's fused kernels read a grad's storage as if it were contiguous
    if not all(grad is not None and grad.is_contiguous() for grad in grads):
        return "a grad is not contiguous"
    return ""


def _own(optimizer: Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    ids = {id(param) for group in optimizer.param_groups for param in group["params"]}
    return [param for param in params if id(param) in ids]


@dataclass
class _Fold:
    """A fold waiting for its step: the factor ``c`` and the skip flag (each or ``None``), and every grad
    it concerns as ``id(param) -> (param, grad, grad._version)``."""

    coefficient: Tensor | None
    skip: Tensor | None
    grads: dict[int, tuple[Tensor, Tensor, int]]

    @classmethod
    def of(cls, params: Sequence[Tensor], coefficient: Tensor | None, skip: Tensor | None) -> _Fold:
        grads = {id(p): (p, p.grad, p.grad._version) for p in params if p.grad is not None}
        return cls(coefficient, skip, grads)

    def compare(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters whose grads are unchanged since the record, and those written in place; the
        others were replaced (a new tensor, or ``None``)."""
        unchanged, written = [], []
        for param, grad, version in self.grads.values():
            if param.grad is grad:
                (unchanged if grad._version == version else written).append(param)
        return unchanged, written

    def skipped(self) -> bool:
        """Whether the skip flag is set (reads it: a host sync)."""
        return self.skip is not None and bool(self.skip)

    def apply_unfolded(self, params: list[Tensor]) -> None:
        """What the unfolded call would have done to the grads of ``params``: multiply them by ``c``, or
        drop them for a skip (reading the skip flag: a host sync)."""
        if self.coefficient is not None and params:
            scale_grads_([param.grad for param in params], self.coefficient)
        if self.skipped():
            for param in params:
                param.grad = None


def _where(optimizer: Optimizer | None, param: Tensor) -> str:
    groups = optimizer.param_groups if optimizer is not None else []
    for g, group in enumerate(groups):
        for i, candidate in enumerate(group["params"]):
            if candidate is param:
                return f"param_groups[{g}]['params'][{i}] (shape {tuple(param.shape)})"
    return f"a parameter of shape {tuple(param.shape)}"


class _Ledger:
    """The folds of one optimizer: the one waiting for its step (``pending``), the attributes set for the
    step under way (``handed``), and a folded skip's grads after its step (``residue``)."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.pending: _Fold | None = None
        self.residue: _Fold | None = None
        self.handed: tuple[_Fold, Optimizer, dict[str, Tensor]] | None = None
        self.optimizer = weakref.ref(optimizer)
        self.warned = False
        # True from the pre-hook to the post-hook: a step is under way, and a fold recorded now would miss
        # its kernel unless it is recorded inside the step's closure (open_closures > 0), which settles it
        self.stepping = _in_step(optimizer)  # hooks registered inside a step run from the next one
        self.open_closures = 0
        optimizer.register_step_pre_hook(self.before_step)
        optimizer.register_step_post_hook(self.after_step)

    def can_take_fold(self) -> bool:
        """Whether a fold recorded now is settled before the next kernel of this optimizer. A step that
        raised never ran its post-hook: found off the call stack, it is closed here and its attributes
        removed."""
        if self.stepping and not self.open_closures:
            optimizer = self.optimizer()
            if optimizer is None or _in_step(optimizer):
                return False
            self.recover()
        return True

    def recover(self) -> None:
        """Close a step that raised before its post-hook: remove the attributes handed to it and put their
        fold back as pending, since its kernel did not complete (a grad it wrote back since makes the next
        settle raise :class:`FoldError`)."""
        self.stepping = False
        if self.handed is not None:
            fold = self.handed[0]
            self.release()
            if self.pending is None:
                self.pending = fold
                ACTIVE_LEDGERS.add(self)

    def before_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Settle the fold now, or, for ``step(closure)``, once the closure has returned (the clip may run
        inside it, as in Composer's Trainer)."""
        if self.stepping:
            self.recover()
        self.stepping = True
        # args holds the optimizer itself, then step()'s own positional arguments
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            self.settle(optimizer)
            return None

        def closure_then_settle(*closure_args: Any, **closure_kwargs: Any) -> Any:
            self.open_closures += 1
            try:
                loss = closure(*closure_args, **closure_kwargs)
            finally:
                self.open_closures -= 1
            self.settle(optimizer)
            return loss

        if len(args) > 1:
            return (args[0], closure_then_settle, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_settle}

    def settle(self, stepping: Optimizer | None) -> None:
        """Resolve the pending fold (or a skip's residue) right before ``stepping``'s kernel: hand it over
        where that is exact, else apply it to the grads. ``None``: another clipping call comes first, so
        the fold is applied to the grads."""
        self.release()
        fold, residue = self.pending or self.residue, self.pending is None
        self.pending = self.residue = None
        ACTIVE_LEDGERS.discard(self)
        if fold is None:
            return
        unchanged, written = fold.compare()
        if written and not (residue and not fold.skipped()):
            self.fail(fold, written[0], residue)
        if written or not unchanged:  # nothing left that the fold concerns (replaced, or clipped already)
            return
        if stepping is not None:
            why_not = self.why_not(stepping, fold, unchanged)
            if not why_not:
                self.hand_over(stepping, fold)
                return
            if not self.warned:
                warn_at_caller(
                    f"fold_into: the clipping is not folded into this step: {why_not}; it is applied to the "
                    "grads instead"
                )
                self.warned = True
        if residue:
            fold.coefficient = None  # the kernel already wrote the clipped grads back
        fold.apply_unfolded(unchanged)

    def hand_over(self, stepping: Optimizer, fold: _Fold) -> None:
        """Set ``grad_scale = 1 / c`` and ``found_inf`` (float32) on ``stepping`` for this one step."""
        attributes = {}
        if fold.coefficient is not None:
            attributes["grad_scale"] = fold.coefficient.reciprocal().to(torch.float32)
        if fold.skip is not None:
            attributes["found_inf"] = fold.skip.to(torch.float32)
        for name, value in attributes.items():
            setattr(stepping, name, value)
        self.handed = (fold, stepping, attributes)
        ACTIVE_LEDGERS.add(self)  # until the post-hook, or a later call that finds the step raised

    def why_not(self, stepping: Optimizer, fold: _Fold, unchanged: list[Tensor]) -> str:
        """Why ``stepping``'s next kernel cannot take ``fold`` as its attributes (``""``: it can)."""
        if any(hasattr(stepping, name) for name in ATTRIBUTES):
            return "optimizer.grad_scale/found_inf are set by other code (a GradScaler or a wrapper)"
        if len(unchanged) != len(fold.grads) or _stepped([stepping]).keys() != fold.grads.keys():
            return "the step updates other grads than those clipped"
        return ""

    def fail(self, fold: _Fold, param: Tensor, residue: bool) -> None:
        where = _where(self.optimizer(), param)
        if residue:
            raise FoldError(
                f"fold_into: a folded skip left the grads in place (unfolded, they are set to None) and the "
                f"grad of {where} was written before the next step (zero_grad(set_to_none=False) or a "
                "further backward); call zero_grad() with set_to_none=True after a step, or pass fold_into=None"
            )
        raise FoldError(
            f"fold_into: the grad of {where} was written after a folded clip and before the step (another "
            "clipper, an in-place edit or a further backward), so the step cannot compute the clipped result; "
            "clip right before step(), or pass fold_into=None"
        )

    def after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Remove the attributes of the step that ran; keep a folded skip's grads as its residue."""
        self.stepping = False
        handed = self.handed
        self.release()
        if self.pending is None:
            ACTIVE_LEDGERS.discard(self)
        if handed is not None and handed[0].skip is not None:
            fold = handed[0]
            self.residue = _Fold.of([param for param, _, _ in fold.grads.values()], None, fold.skip)
            ACTIVE_LEDGERS.add(self)

    def release(self) -> None:
        """Remove the attributes this library set that are still there."""
        if self.handed is not None:
            _, stepping, attributes = self.handed
            for name, value in attributes.items():
                if getattr(stepping, name, None) is value:
                    delattr(stepping, name)
        self.handed = None


_LEDGERS: weakref.WeakKeyDictionary[Optimizer, _Ledger] = weakref.WeakKeyDictionary()
ACTIVE_LEDGERS: weakref.WeakSet[_Ledger] = weakref.WeakSet()
"""Ledgers with a pending fold, a skip's residue, or attributes handed to a step: while it is empty, no
fold is waiting and :func:`settle_pending` has nothing to do."""


def settle_pending(named: Sequence[Named]) -> None:
    """Apply every fold still waiting for its step that concerns a grad of the parameters ``named`` to the
    grads, the unfolded way, before another clipping call reads them (a pending skip is read: a host
    sync). Raises :class:`FoldError` where a folded grad was written in place since."""
    ids = {id(param) for _, param in named}
    for ledger in list(ACTIVE_LEDGERS):
        if ledger.handed is not None and not ledger.can_take_fold():  # recovers a step that raised
            continue
        fold = ledger.pending or ledger.residue
        if fold is not None and not ids.isdisjoint(fold.grads):
            ledger.settle(None)


def prepare_folding(optimizers: Optimizers) -> None:
    """Give each optimizer that supports folding its step hooks now. A clipping call registers them itself,
    but a step already under way when they are registered (``step(closure)`` with the clip inside the
    closure, as in Composer's Trainer) does not run them, so that call does not fold; preparing before the
    first step lets it fold too."""
    _register([optimizer for optimizer in optimizers if supports_folding(optimizer)])


def _register(optimizers: Optimizers) -> None:
    """Give every optimizer its ledger and step hooks, once."""
    for optimizer in optimizers:
        if optimizer not in _LEDGERS:
            _LEDGERS[optimizer] = _Ledger(optimizer)


def hand_to_step(
    optimizers: Optimizers, params: Sequence[Tensor], coefficient: Tensor | None, skip: Tensor | None
) -> None:
    """Record the clipping ``coefficient`` (0-d) and ``skip`` flag (0-d bool), each or ``None``, of the grads
    of ``params`` for the next ``step()`` of every optimizer in ``optimizers`` (each given its hooks by
    :meth:`FoldPlan.make`). No host sync."""
    if coefficient is None and skip is None:
        return
    for optimizer in optimizers:
        ledger = _LEDGERS[optimizer]
        ledger.pending = _Fold.of(_own(optimizer, params), coefficient, skip)
        ACTIVE_LEDGERS.add(ledger)


def scale_or_fold(
    optimizers: Optimizers,
    plan: FoldPlan,
    params: Sequence[Tensor],
    grads: list[Tensor],
    coefficient: Tensor | None,
    skip: Tensor | None,
) -> bool:
    """The last stage of a clipping call with ``optimizers`` (at least one): ``grads ← grads ·
    coefficient`` (0-d, or ``None``: nothing to scale), except where ``plan`` folds the factor; then the
    factor, and a ``skip`` flag, are handed to the next step of ``optimizers`` (:func:`hand_to_step`) for
    the grads of ``params``. Returns whether anything was folded. No host sync."""
    if coefficient is not None and not plan.factor:
        scale_grads_(grads, coefficient)
    hand_to_step(optimizers, params, coefficient if plan.factor else None, skip)
    return (plan.factor and coefficient is not None) or skip is not None
