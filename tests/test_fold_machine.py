"""Folding against users' loops: a stateful test that runs two twin set-ups, one clipping with ``fold_into``
and one without, through random interleavings of what a training loop may do between ``backward()`` and
``step()``.

The actions: a backward pass (accumulating, with a parameter left out, with an inf or NaN grad), a clip
(every type, every ``nonfinite`` mode, ``skip_spikes``), torch's ``clip_grad_norm_`` / ``clip_grad_value_``,
an in-place grad edit, ``step()``, ``step(closure)`` with the backward and the clip inside the closure (as
Composer's Trainer steps), a ``GradScaler`` step, ``zero_grad`` (both ``set_to_none``), reading
``optimizer.state[p]``, and setting or deleting ``grad_scale`` / ``found_inf`` by hand.

After every action the twins agree: the same weights and optimizer state within rounding (the fold divides
inside the kernel where the unfolded clip multiplies first), the same clipping statistics, the same
exceptions, and the same ``grad_scale`` / ``found_inf`` attributes (the fold leaves none of its own behind).
The one allowed outcome where they differ: the folded twin raises ``FoldError`` with its weights and
optimizer state as they were before the action; the twins are then made equal again and the run goes on.

One machine per optimizer (fused SGD with momentum, Adam, AdamW) and dtype (float32, bfloat16, float64),
except fused SGD in bfloat16 (its CPU kernel is wrong with momentum for reduced precision). ``make test``
runs a fixed, small set of examples; ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``) runs many more.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import Tensor

from gradclip_algo import FoldError, GradientClipper
from gradclip_algo.folding import ATTRIBUTES

SHAPES = ((4, 3), (5,), (2, 2))
CLIPS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "norm": ("norm", 1.0, {}),
    "norm-tight": ("norm", 0.05, {}),
    "norm-pinf": ("norm", 2.0, {"norm_type": math.inf}),
    "norm-pinf-unfoldable": ("norm", 0.5, {"norm_type": math.inf}),
    "norm-skip": ("norm", 1.0, {"nonfinite": "skip"}),
    "norm-zero": ("norm", 1.0, {"nonfinite": "zero"}),
    "norm-error": ("norm", 1.0, {"nonfinite": "error"}),
    "norm-spikes": ("norm", 1.0, {"skip_spikes": 2.0, "spike_window": 4}),
    "value": ("value", 0.1, {}),
    "value-skip": ("value", 0.1, {"nonfinite": "skip"}),
    "adaptive": ("adaptive", 0.05, {}),
    "quantile": ("quantile", math.inf, {"window": 4}),
    "zscore-skip": ("zscore", math.inf, {"warmup_steps": 2, "nonfinite": "skip"}),
    "adagc-spikes": ("adagc", math.inf, {"warmup_steps": 2, "skip_spikes": 2.0, "spike_window": 4}),
}
TOLERANCES = {
    torch.float32: {"rtol": 2e-5, "atol": 1e-6},
    # the fold divides in float32 inside the kernel, the unfolded clip rounds g·c to bfloat16 first
    torch.bfloat16: {"rtol": 3e-2, "atol": 1e-2},
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
}
EXAMPLES = {"ci": 12, "fuzz": 400}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]

pytestmark = [
    pytest.mark.filterwarnings("ignore:fold_into:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*non-finite.*:UserWarning"),
]


def make_optimizer(kind: str, params: list[Tensor]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, fused=True)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)


def new_scaler() -> torch.amp.GradScaler:
    """Scale 1, halved after a step with inf/NaN grads, never grown."""
    return torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1 << 30)


class Twin:
    """Parameters, a fused optimizer, a GradScaler and one clipper per entry of :data:`CLIPS`, made on
    first use, folding into the optimizer or not."""

    def __init__(self, initial: list[Tensor], kind: str, fold: bool) -> None:
        self.params = [tensor.clone().requires_grad_() for tensor in initial]
        self.optimizer = make_optimizer(kind, self.params)
        self.fold = fold
        self.clippers: dict[str, GradientClipper] = {}
        self.scaler = new_scaler()

    def clipper(self, name: str) -> GradientClipper:
        if name not in self.clippers:
            clipping_type, threshold, options = CLIPS[name]
            fold_into = self.optimizer if self.fold else None
            self.clippers[name] = GradientClipper(clipping_type, threshold, fold_into=fold_into, **options)
        return self.clippers[name]

    def backward(self, weights: list[Tensor], unused: int) -> Tensor:
        """A real backward pass whose grads are ``weights`` (times the scaler's scale), leaving out
        parameter ``unused``."""
        loss = sum(
            (param * weight.to(param.dtype)).sum()
            for i, (param, weight) in enumerate(zip(self.params, weights, strict=True))
            if i != unused
        )
        assert isinstance(loss, Tensor)
        self.scaler.scale(loss).backward()
        return loss.detach()

    def snapshot(self) -> list[Tensor]:
        """The weights and every tensor of the optimizer state, copied."""
        state = [value for entry in self.optimizer.state.values() for value in entry.values()]
        return [t.detach().clone() for t in [*self.params, *state] if isinstance(t, Tensor)]

    def copy_from(self, other: Twin) -> None:
        """Make this twin equal to ``other``: weights, grads, optimizer state and attributes, clipper
        statistics and the scaler."""
        with torch.no_grad():
            for param, source in zip(self.params, other.params, strict=True):
                param.copy_(source)
                param.grad = None if source.grad is None else source.grad.clone()
        self.optimizer.load_state_dict(copy.deepcopy(other.optimizer.state_dict()))
        for name in ATTRIBUTES:
            if hasattr(other.optimizer, name):
                setattr(self.optimizer, name, getattr(other.optimizer, name).clone())
            elif hasattr(self.optimizer, name):
                delattr(self.optimizer, name)
        for name, clipper in other.clippers.items():
            self.clipper(name).load_state_dict(clipper.state_dict())
        self.scaler = new_scaler()
        self.scaler.load_state_dict(other.scaler.state_dict())
        self.scaler.scale(torch.ones(()))  # a loaded scaler builds its scale at its first scale() call


Outcome = tuple[Any, type[BaseException] | None]


def attempt(action: Callable[[Twin], Any], twin: Twin) -> Outcome:
    try:
        return action(twin), None
    except Exception as err:  # compared with the other twin's
        return None, type(err)


def assert_close(actual: Any, expected: Any, dtype: torch.dtype, what: str) -> None:
    torch.testing.assert_close(
        actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **TOLERANCES[dtype]
    )


class FoldTwins(RuleBasedStateMachine):
    """The twins, built for :attr:`kind` and :attr:`dtype` (set by :func:`machine`)."""

    kind = "adamw"
    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        initial = [torch.randn(shape, generator=gen, dtype=torch.float64).to(self.dtype) for shape in SHAPES]
        self.folded = Twin(initial, self.kind, fold=True)
        self.plain = Twin(initial, self.kind, fold=False)
        self.aborted = False
        """A step raised in both twins: the folded one keeps the attributes handed to that step until its
        next clip or step."""

    def both(self, action: Callable[[Twin], Any], settles: bool = False) -> tuple[Any, Any] | None:
        """``action`` on each twin: the same exception or none, or a ``FoldError`` of the folded twin before
        it changed its weights or optimizer state (then the twins are made equal; returns ``None``).
        ``settles``: the action clips or steps.

        After a folded skip the folded twin keeps grads that the plain twin dropped (the documented
        difference), so an action that reads them may raise in one twin only; the twins are then made
        equal."""
        before = self.folded.snapshot()
        kept = [p.grad is not None for p in self.folded.params] != [
            p.grad is not None for p in self.plain.params
        ]
        folded, folded_error = attempt(action, self.folded)
        plain, plain_error = attempt(action, self.plain)
        if folded_error is FoldError:
            assert plain_error is not FoldError
            after = self.folded.snapshot()
            torch.testing.assert_close(
                after, before, rtol=0, atol=0, equal_nan=True, msg="FoldError after a change"
            )
            self.folded.copy_from(self.plain)
            return None
        if kept and folded_error is not plain_error:
            self.folded.copy_from(self.plain)
            return None
        assert folded_error is plain_error
        if folded_error is not None:
            self.aborted = True
        elif settles:
            self.aborted = False
        return None if folded_error else (folded, plain)

    # ---- actions -------------------------------------------------------------------------------------

    @rule(
        seed=st.integers(0, 1 << 16),
        exponent=st.integers(-3, 3),
        unused=st.integers(-1, len(SHAPES) - 1),
        poison=st.sampled_from([None, None, None, math.nan, math.inf]),
    )
    def backward(self, seed: int, exponent: int, unused: int, poison: float | None) -> None:
        weights = self.weights(seed, exponent, poison)
        self.both(lambda twin: twin.backward(weights, unused))

    @rule(name=st.sampled_from(sorted(CLIPS)))
    def clip(self, name: str) -> None:
        self.compare_stats(self.both(lambda twin: twin.clipper(name)(twin.params), settles=True))

    @rule(max_norm=st.sampled_from([0.01, 1.0, 100.0]))
    def foreign_clip_norm(self, max_norm: float) -> None:
        self.both(lambda twin: torch.nn.utils.clip_grad_norm_(twin.params, max_norm))

    @rule(clip_value=st.sampled_from([0.01, 1.0]))
    def foreign_clip_value(self, clip_value: float) -> None:
        self.both(lambda twin: torch.nn.utils.clip_grad_value_(twin.params, clip_value))

    @rule(index=st.integers(0, len(SHAPES) - 1), factor=st.sampled_from([0.0, 0.5, -2.0]))
    def edit_in_place(self, index: int, factor: float) -> None:
        def edit(twin: Twin) -> None:
            grad = twin.params[index].grad
            if grad is not None:
                grad.mul_(factor)

        self.both(edit)

    @rule()
    def step(self) -> None:
        self.both(lambda twin: twin.optimizer.step(), settles=True)

    @rule(
        seed=st.integers(0, 1 << 16),
        exponent=st.integers(-3, 3),
        name=st.sampled_from(sorted(CLIPS)),
    )
    def step_with_closure(self, seed: int, exponent: int, name: str) -> None:
        """As Composer's Trainer steps: ``step(closure)``, the backward and the clip inside the closure."""
        weights = self.weights(seed, exponent, None)

        def closure_step(twin: Twin) -> None:
            def closure() -> Tensor:
                loss = twin.backward(weights, -1)
                twin.clipper(name)(twin.params)
                return loss

            twin.optimizer.step(closure)

        self.both(closure_step, settles=True)

    # GradScaler.step() asserts that some grad was checked for inf, and then stays mid-iteration
    @precondition(lambda self: self.may_skip() and any(p.grad is not None for p in self.plain.params))
    @rule(unscale_first=st.booleans())
    def scaler_step(self, unscale_first: bool) -> None:
        def step(twin: Twin) -> None:
            if unscale_first:
                twin.scaler.unscale_(twin.optimizer)
            twin.scaler.step(twin.optimizer)
            twin.scaler.update()

        self.both(step, settles=True)

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none: bool) -> None:
        self.both(lambda twin: twin.optimizer.zero_grad(set_to_none=set_to_none))

    @rule(index=st.integers(0, len(SHAPES) - 1))
    def read_optimizer_state(self, index: int) -> None:
        self.both(lambda twin: twin.optimizer.state[twin.params[index]])  # a defaultdict: may add {}

    @precondition(lambda self: self.may_skip())
    @rule(name=st.sampled_from(ATTRIBUTES), value=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    def set_attribute(self, name: str, value: float) -> None:
        self.both(lambda twin: setattr(twin.optimizer, name, torch.tensor(value)))

    @precondition(lambda self: any(hasattr(self.plain.optimizer, name) for name in ATTRIBUTES))
    @rule()
    def delete_attributes(self) -> None:
        def delete(twin: Twin) -> None:
            for name in ATTRIBUTES:
                if hasattr(twin.optimizer, name):
                    delattr(twin.optimizer, name)

        self.both(delete)

    # ---- checks --------------------------------------------------------------------------------------

    @invariant()
    def twins_agree(self) -> None:
        assert_close(self.folded.snapshot(), self.plain.snapshot(), self.dtype, "weights and optimizer state")
        for name in ATTRIBUTES:
            if not (self.aborted and hasattr(self.folded.optimizer, name)):
                assert hasattr(self.folded.optimizer, name) == hasattr(self.plain.optimizer, name), name

    def compare_stats(self, outcomes: tuple[Any, Any] | None) -> None:
        if outcomes is None:
            return
        folded, plain = outcomes
        assert (folded is None) == (plain is None)
        if folded is None:
            return
        assert bool(folded.skipped) == bool(plain.skipped)
        names = ["grad_norm", "clipped_grad_norm", "clipped_fraction"]
        # grads clipped before (by a folded step: rounded otherwise) can sit on either side of the threshold
        if plain.threshold is not None and abs(
            float(plain.grad_norm) - float(plain.threshold)
        ) <= 1e-4 * float(plain.threshold):
            names.remove("clipped_fraction")
        for name in names:
            assert_close(getattr(folded, name), getattr(plain, name), self.dtype, name)

    def may_skip(self) -> bool:
        """Whether a step skipped by a ``found_inf`` set by hand or by the GradScaler is well defined:
        torch's fused SGD leaves its momentum buffers uninitialised when ``found_inf`` skips their first
        step (folded or not), so for SGD only once every parameter has one."""
        optimizer = self.plain.optimizer
        return self.kind != "sgd" or all(optimizer.state.get(param) for param in self.plain.params)

    def weights(self, seed: int, exponent: int, poison: float | None) -> list[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        weights = [
            torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**exponent for shape in SHAPES
        ]
        if poison is not None:
            weights[seed % len(SHAPES)].view(-1)[0] = poison
        return weights


def machine(kind: str, dtype: torch.dtype) -> type:
    twins = type(f"FoldTwins_{kind}_{dtype}", (FoldTwins,), {"kind": kind, "dtype": dtype})
    case = twins.TestCase
    case.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=25,
        deadline=None,
        derandomize=os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci",
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow],
    )
    return case


TestFusedSGDFloat32 = machine("sgd", torch.float32)
TestFusedSGDFloat64 = machine("sgd", torch.float64)
TestFusedAdamFloat32 = machine("adam", torch.float32)
TestFusedAdamBFloat16 = machine("adam", torch.bfloat16)
TestFusedAdamFloat64 = machine("adam", torch.float64)
TestFusedAdamWFloat32 = machine("adamw", torch.float32)
TestFusedAdamWBFloat16 = machine("adamw", torch.bfloat16)
TestFusedAdamWFloat64 = machine("adamw", torch.float64)
