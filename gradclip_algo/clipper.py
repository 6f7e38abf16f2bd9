"""``GradientClipper``: a validated clipping set-up, with the statistics of stateful rules.

A call is a pipeline of five stages, each wrapping the rule rather than living inside it:

1. collect the parameters with grads, less the excluded ones (:mod:`gradclip_algo.parameters`);
2. handle non-finite grads (:mod:`gradclip_algo.nonfinite`);
3. skip a step whose norm spikes (:mod:`gradclip_algo.spikes`);
4. run the rule (:mod:`gradclip_algo.rules`);
5. scale the grads by the rule's factor, or fold it into the optimizers' next step
   (:mod:`gradclip_algo.folding`).

Stages 2 and 3 may end the call with a skipped step. The global norm is computed at most once per norm
type and shared by stages 2 to 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gradclip_algo.caller import warn_at_caller
from gradclip_algo.device_state import move_to_, update_unless_
from gradclip_algo.distributed import Shards, check_process_group, local_shards
from gradclip_algo.folding import (
    ACTIVE_LEDGERS,
    NO_FOLD,
    FoldPlan,
    Optimizers,
    check_fold_into,
    factor_is_foldable,
    prepare_folding,
    scale_or_fold,
    settle_pending,
)
from gradclip_algo.nonfinite import NONFINITE_MODES, check_nonfinite_, nonfinite_error
from gradclip_algo.norm_history import check_history
from gradclip_algo.norms import scale_grads_
from gradclip_algo.parameters import Exclusion, Named, Parameters, collect, with_grads
from gradclip_algo.rules import CLIPPING_TYPES, RULES, State
from gradclip_algo.spikes import SPIKE_WINDOW, init_spike_state, judge_spike_
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import (
    check_bool,
    check_choice,
    check_int,
    check_known_options,
    check_positive_number,
)

COMMON_OPTIONS = (
    "exclude",
    "nonfinite",
    "error_if_nonfinite",
    "skip_spikes",
    "spike_window",
    "process_group",
)


class GradientClipper:
    """Validate a clipping set-up once, then call it every step between ``backward()`` and ``step()``.

    ``GradientClipper(clipping_type, clipping_threshold, **options)`` takes the arguments of
    :func:`~gradclip_algo.apply_gradient_clipping`; every bad value raises here, naming the field, the value
    and what is allowed. Stateful rules keep their statistics (tensors on the grads' device) in the
    clipper; ``state_dict()`` / ``load_state_dict()`` carry them through checkpoints.

    ``skip_spikes=k`` (any type; default ``None``: off) skips the step when the global grad norm exceeds
    the mean of the last ``spike_window`` (default 128) norms by more than k standard deviations: every
    grad becomes ``None`` and ``ClipStats.skipped`` is ``True`` (see :mod:`gradclip_algo.spikes`; one host
    sync per step unless folded).

    ``fold_into`` (Python only; default ``None``): the optimizer, or list of optimizers, whose next
    ``step()`` follows each call. Where they are torch's fused optimizers (``fused=True``) and step exactly
    the clipped parameters, the factor of the norm-based types becomes their ``grad_scale`` and a skip their
    ``found_inf`` (no host sync, grads not set to ``None``); ``.grad`` holds the unclipped grads until
    ``step()``, which writes the clipped ones back. A call that cannot fold rescales the grads as usual, and
    the first such call warns. Details: :mod:`gradclip_algo.folding`.

    ``process_group`` (Python only; default ``None``): the group of ranks across which the model's
    parameters are split into pipeline stages; norms, statistics and skip decisions are then global
    across the stages (see :mod:`gradclip_algo.distributed`).

    Warnings, once per clipper: an ``exclude`` glob that matches no parameter name, and a call whose
    tensors neither have a grad nor require one (gradients passed in place of parameters).
    """

    def __init__(
        self,
        clipping_type: str,
        clipping_threshold: float,
        *,
        fold_into: Optimizer | Optimizers | None = None,
        **options: Any,
    ) -> None:
        check_choice("clipping_type", clipping_type, CLIPPING_TYPES)
        self.clipping_type = clipping_type
        self.rule = RULES[clipping_type]
        self.clipping_threshold = check_positive_number(
            "clipping_threshold", clipping_threshold, allow_inf=self.rule.threshold_may_be_inf
        )
        check_known_options(clipping_type, options, (*self.rule.options.names(), *COMMON_OPTIONS))
        self.options = self.rule.options(**{k: v for k, v in options.items() if k not in COMMON_OPTIONS})
        nonfinite = check_choice("nonfinite", options.get("nonfinite", "propagate"), NONFINITE_MODES)
        if check_bool("error_if_nonfinite", options.get("error_if_nonfinite", False)):
            if nonfinite not in ("propagate", "error"):
                raise ValueError(f"error_if_nonfinite: True contradicts nonfinite={nonfinite!r}; give one")
            nonfinite = "error"
        self.nonfinite = nonfinite
        self.exclude = options.get("exclude")
        self.exclusion = Exclusion(self.exclude) if self.exclude is not None else None
        skip_spikes = options.get("skip_spikes")
        self.skip_spikes = None if skip_spikes is None else check_positive_number("skip_spikes", skip_spikes)
        if "spike_window" in options and self.skip_spikes is None:
            raise ValueError(
                f"spike_window: {options['spike_window']!r} has no effect without skip_spikes; set "
                "skip_spikes (e.g. 6.0) too, or drop spike_window"
            )
        # at least 4 norms, so that half a window has the 2 a standard deviation needs
        self.spike_window = check_int("spike_window", options.get("spike_window", SPIKE_WINDOW), 4)
        self.process_group = check_process_group("process_group", options.get("process_group"))
        self.stateful = self.rule.update is not None or self.skip_spikes is not None
        """Whether the clipper keeps statistics from call to call (a stateful rule, or spike skipping)."""
        self.fold_into = check_fold_into("fold_into", fold_into)
        prepare_folding(self.fold_into)
        self.factor_why_not = self._factor_why_not()
        if (
            self.fold_into
            and not self.rule.one_factor
            and self.nonfinite != "skip"
            and self.skip_spikes is None
        ):
            warn_at_caller(
                f"fold_into: clipping_type={clipping_type!r} clips each element, unit or tensor by its own "
                "factor and no skip is set (nonfinite='skip' or skip_spikes), so there is nothing to fold; "
                "fold_into has no effect"
            )
        self.state: State | None = None
        self.spike_state: State | None = None
        self._warned: set[str] = set()  # the once-per-clipper warnings given so far

    @torch.no_grad()
    def __call__(
        self,
        parameters: Parameters,
        with_stats: bool | Literal["clipped"] = True,
        *,
        fold_into: Optimizer | Optimizers | None = None,
    ) -> ClipStats | None:
        """Clip the grads of ``parameters`` in place, or fold the clipping into the optimizers' next step,
        and return what was done.

        ``with_stats=False`` returns ``None`` and skips the statistics where they cost extra passes over
        the grads ('value': its norms and clipped count); the clipping itself is the same. A step skipped by
        dropping the grads still returns its ``ClipStats`` (a folded skip, decided on the device, does not).
        ``with_stats='clipped'`` measures only whether anything was clipped, where that is cheaper than the
        statistics ('value': ``max|g| > λ``, taken in the clamping pass, in place of its norms and count):
        the ``ClipStats`` then holds ``clipped_fraction`` 1.0 or 0.0 and NaN norms; the other types return
        all their statistics. ``fold_into``: the optimizers of this call, in place of the clipper's own
        (``()``: none).
        """
        if with_stats != "clipped" and not isinstance(with_stats, bool):
            raise ValueError(f"with_stats: expected true, false or 'clipped', got {with_stats!r}")
        optimizers = self.fold_into if fold_into is None else check_fold_into("fold_into", fold_into)
        found = self._collect(parameters)
        # a sharded rank without grads still joins reductions
        if not found.shards.grads and found.shards.group is None:
            self._warn_nothing_clipped(found)
            return ClipStats.empty() if with_stats else None
        plan = self._plan(optimizers, found) if optimizers else NO_FOLD
        # a skip decided on the device (for the optimizers' found_inf), or the stats of a step skipped here
        skip = self._check_nonfinite(found, plan) if self.nonfinite != "propagate" else None
        if self.skip_spikes is not None and not isinstance(skip, ClipStats):
            skip = self._judge_spike(found, plan, skip)
        if isinstance(skip, ClipStats):
            return skip
        stats = self._clip(found.shards, with_stats, skip)
        coefficient = None if stats is None else stats.coefficient
        folded = False
        if optimizers:
            params = found.params if skip is None else [p for _, p in found.everything]
            folded = scale_or_fold(optimizers, plan, params, found.shards.grads, coefficient, skip)
        elif coefficient is not None:
            scale_grads_(found.shards.grads, coefficient)
        if stats is None or not with_stats:
            return None
        stats = replace(stats, folded=folded)
        return stats if skip is None else stats.skipped_where(skip)

    def _collect(self, parameters: Parameters) -> _Collected:
        """The first stage: the tensors of ``parameters``, those whose grads get clipped, and their shards.
        A fold of these grads still waiting for its step is applied first, as unfolded."""
        module = parameters if isinstance(parameters, nn.Module) else None
        everything = collect(parameters, names=self.exclusion is not None)
        if ACTIVE_LEDGERS:
            settle_pending(everything)
        selected, params, grads = with_grads(everything, self.exclusion, module)
        if self.exclusion is not None and everything:
            self._warn_unmatched(everything)
        shards = local_shards(params, module, grads, self.process_group)
        return _Collected(module, everything, selected, params, grads, shards)

    def _check_nonfinite(self, found: _Collected, plan: FoldPlan) -> Tensor | ClipStats | None:
        """The non-finite stage (:func:`~gradclip_algo.nonfinite.check_nonfinite_`): the skip flag for the
        optimizers where the plan folds skips, else ``None``, or the stats of a step skipped here; raises
        :class:`~gradclip_algo.nonfinite.NonFiniteGradError` for ``nonfinite='error'``."""
        check = check_nonfinite_(self.nonfinite, found.shards, self.options.stats_norm_type, plan.skip)
        if check.stop is None:
            return check.skip
        if self.nonfinite == "error":
            raise self._nonfinite_error(found.selected, found.grads, found.module, check.stop)
        return _skip_step(found.everything, check.stop)

    def _plan(self, optimizers: Optimizers, found: _Collected) -> FoldPlan:
        """What this call folds into ``optimizers`` (at least one; see
        :class:`~gradclip_algo.folding.FoldPlan`); a skip of a stateful rule only once its state exists. Warns
        once when the clipper's own ``fold_into`` cannot be folded into."""
        plan = FoldPlan.make(
            optimizers,
            found.params,
            [param for _, param in found.everything if param.grad is not None],
            local=found.shards.layout == "local",
            factor_why_not=self.factor_why_not,
        )
        if plan.skip and self.rule.init is not None and self.state is None:
            plan = replace(plan, skip=False)
        if plan.why_not and self.fold_into:
            self._warn_once(
                "fold",
                f"fold_into: the clipping is not folded into the optimizer: {plan.why_not}; the grads are "
                "rescaled instead",
            )
        return plan

    def _factor_why_not(self) -> str | None:
        """``None`` where the rule clips by no single factor, else why the factor can never be folded
        (``""``: it can): its reciprocal must be a finite float32 for every norm, which a fixed threshold
        can guarantee and one computed on the device (quantile, zscore) cannot."""
        if not self.rule.one_factor:
            return None
        if self.rule.init is not None:
            return "the threshold is computed on the device, so 1/coefficient could overflow float32"
        norm_type = self.options.stats_norm_type
        if not factor_is_foldable(self.clipping_threshold, norm_type):
            return (
                f"1/coefficient could overflow float32 at clipping_threshold={self.clipping_threshold!r} "
                f"with norm_type={norm_type!r} (a fold needs a threshold of at least 2 for p = inf or p <= 1)"
            )
        return ""

    def _judge_spike(
        self, found: _Collected, plan: FoldPlan, skip: Tensor | None
    ) -> Tensor | ClipStats | None:
        """Judge the global L2 norm against the spike window. Returns the skip flag for the optimizers
        where the plan folds skips, else the stats of a step skipped here (one host sync), or ``skip``.

        A step already skipped for non-finite grads is not judged: the window stays as it was."""
        shards = found.shards
        if self.spike_state is None:
            self.spike_state = init_spike_state(shards.device, self.spike_window)
        move_to_(self.spike_state, shards.device)
        norm = shards.global_norm(2.0)
        spike = judge_spike_(norm, self.spike_state, self.skip_spikes, skip)
        if plan.skip:
            return spike if skip is None else skip | spike
        if bool(spike):  # the host sync skipping needs unless folded
            return _skip_step(found.everything, norm)
        return skip

    def _clip(
        self, shards: Shards, with_stats: bool | Literal["clipped"], skip: Tensor | None
    ) -> ClipStats | None:
        """The rule on ``shards`` (without statistics, or with only its clipped flag, where the rule has
        such a mode and no more is asked for); a stateful rule's state is made at the first call, and left
        as it was where ``skip``."""
        if with_stats == "clipped" and self.rule.clip_flagging is not None:
            return ClipStats.clipped_only(self.rule.clip_flagging(shards, self.clipping_threshold))
        if not with_stats and self.rule.clip_without_stats is not None:
            self.rule.clip_without_stats(shards, self.clipping_threshold)
            return None
        if self.rule.clip is not None:
            return self.rule.clip(shards, self.clipping_threshold, self.options)
        init, update = self.rule.init, self.rule.update
        assert init is not None and update is not None
        if self.state is None:
            self.state = init(self.options, shards.device)
        state = self.state
        move_to_(state, shards.device)
        return update_unless_(
            state, skip, lambda: update(shards, self.clipping_threshold, self.options, state)
        )

    def _warn_once(self, kind: str, message: str) -> None:
        """Warn at the user's line, once per clipper for each ``kind`` of warning."""
        if kind not in self._warned:
            self._warned.add(kind)
            warn_at_caller(message)

    def _warn_unmatched(self, everything: list[Named]) -> None:
        """Warn where an ``exclude`` glob matched no parameter name."""
        assert self.exclusion is not None
        unmatched = self.exclusion.unmatched()
        if unmatched:
            examples = ", ".join(repr(n) for names, _ in everything[:3] for n in names[:1])
            self._warn_once(
                "exclude",
                f"exclude: pattern(s) {', '.join(map(repr, unmatched))} match no parameter name (names look "
                f"like {examples}); nothing is excluded by them",
            )

    def _warn_nothing_clipped(self, found: _Collected) -> None:
        """Warn where a call clips nothing: no tensor has a grad (before ``backward()``, or grads passed in
        place of parameters), or ``exclude`` leaves out every one that has."""
        everything = found.everything
        if not everything:
            return
        if any(param.grad is not None for _, param in everything):
            self._warn_once(
                "excluded",
                f"exclude: every parameter that has a .grad is excluded ({self.exclude!r}), so nothing is "
                "clipped",
            )
        elif any(param.requires_grad for _, param in everything):
            self._warn_once(
                "no grads",
                f"parameters: none of the {len(everything)} parameters has a .grad yet, so nothing is clipped "
                "and the norms are 0; clip after loss.backward()",
            )
        else:
            self._warn_once(
                "grads passed",
                f"parameters: none of the {len(everything)} tensors has a .grad or requires grad, so "
                "nothing is clipped; pass the parameters (e.g. model.parameters()), not their gradients",
            )

    def _nonfinite_error(
        self, selected: list[Named], grads: list[Tensor], module: nn.Module | None, norm: Tensor
    ) -> Exception:
        if module is not None and self.exclusion is None:  # names were not built on the fast path
            selected, _, grads = with_grads(collect(module), None)
        pairs = [(names[0] if names else None, param) for names, param in selected]
        return nonfinite_error(pairs, grads, norm)

    def state_dict(self) -> dict[str, Any]:
        """``rule``: the rule's statistics, ``spikes``: the spike window; each present once it exists.

        Tensors only (as Composer's ``weights_only`` checkpoint loading needs); empty when stateless.
        """
        parts = {"rule": self.state, "spikes": self.spike_state}
        return {
            name: {key: value.clone() for key, value in part.items()}
            for name, part in parts.items()
            if part is not None
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, all or nothing: every key, dtype, shape and value is
        checked before anything is replaced. Tensors move to the grads' device at the next call."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state: expected a mapping with keys rule and/or spikes, got {state!r}")
        unknown = sorted(map(str, set(state) - {"rule", "spikes"}))
        if unknown:
            raise ValueError(f"state: unknown key(s) {', '.join(unknown)}; allowed: rule, spikes")
        rule_state = spike_state = None
        if "rule" in state:
            if self.rule.init is None or self.rule.check_state is None:
                raise ValueError(
                    f"state: holds the statistics of a stateful clipping type, but clipping_type="
                    f"{self.clipping_type!r} keeps none; was the checkpoint written with another clipping_type?"
                )
            rule_state = _checked_state("rule", state["rule"], self.rule.init(self.options, "cpu"))
            self.rule.check_state(rule_state, self.options)
        if "spikes" in state:
            if self.skip_spikes is None:
                raise ValueError("state: holds a spike window, but skip_spikes is not set")
            spike_state = _checked_state(
                "spikes", state["spikes"], init_spike_state("cpu", self.spike_window)
            )
            check_history("state.spikes", spike_state)
        self.state, self.spike_state = rule_state, spike_state

    def __repr__(self) -> str:
        options = self.options.as_dict()
        if self.exclude is not None:
            options["exclude"] = self.exclude
        if self.nonfinite != "propagate":
            options["nonfinite"] = self.nonfinite
        if self.skip_spikes is not None:
            options.update(skip_spikes=self.skip_spikes, spike_window=self.spike_window)
        settings = "".join(f", {name}={value!r}" for name, value in options.items())
        return (
            f"{type(self).__name__}(clipping_type={self.clipping_type!r}, "
            f"clipping_threshold={self.clipping_threshold!r}{settings})"
        )


def _checked_state(name: str, given: Any, fresh: State) -> State:
    """A copy of ``given`` if its tensors match ``fresh`` ones in key, dtype and shape (empty: any shape)."""
    if not isinstance(given, Mapping) or set(given) != set(fresh):
        got = ", ".join(sorted(map(str, given))) if isinstance(given, Mapping) else repr(given)
        raise ValueError(
            f"state.{name}: expected keys {', '.join(sorted(fresh))}, got {got or 'none'}; "
            "was the checkpoint written with other settings?"
        )
    for key, value in given.items():
        want = fresh[key]
        if (
            not isinstance(value, Tensor)
            or value.dtype != want.dtype
            or value.ndim != want.ndim
            or (want.numel() and value.shape != want.shape)
        ):
            got = (
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else repr(value)
            )
            raise ValueError(
                f"state.{name}.{key}: expected a {want.dtype} tensor of shape {tuple(want.shape)}, got {got}; "
                "was the checkpoint written with other settings?"
            )
    return {key: value.detach().clone() for key, value in given.items()}


@dataclass(frozen=True)
class _Collected:
    """What a call clips: ``everything`` (each distinct tensor passed, with its names where ``exclude``
    needs them), the ``selected`` ones with grads (also as tensors, ``params``) and their ``grads``, and
    the ``shards`` of those grads. ``module``: what was passed, where it was a module."""

    module: nn.Module | None
    everything: list[Named]
    selected: list[Named]
    params: list[Tensor]
    grads: list[Tensor]
    shards: Shards


def _skip_step(everything: list[Named], norm: Tensor) -> ClipStats:
    """Drop every grad, excluded ones too, so that the whole optimizer step is skipped."""
    for _, param in everything:
        param.grad = None
    return ClipStats.skipped_step(norm)
