"""``GradClipAlgo``: the Composer algorithm around :class:`~gradclip_algo.clipper.GradientClipper`.

Its class name differs from Composer's own ``GradientClipping``: Composer keys checkpoint entries by
``type(algorithm).__qualname__`` and logs ``enabled_algorithms/<class name>``, so the two never collide.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradclip_algo.extras import missing_extra

try:
    from composer.core import Algorithm, Callback, Event, Precision, State
    from composer.loggers import Logger
except ModuleNotFoundError as err:
    raise missing_extra(err, "gradclip_algo.GradClipAlgo") from None

from gradclip_algo.caller import warn_at_caller
from gradclip_algo.clipper import GradientClipper
from gradclip_algo.folding import prepare_folding, supports_folding
from gradclip_algo.keys import NAME, REQUIRED, check_keys
from gradclip_algo.layer_norms import LayerGradNorms, grad_norms_by_name, norm_metrics
from gradclip_algo.nonfinite import NonFiniteGradError
from gradclip_algo.rules import RULES
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_batches, check_bool, check_int

METRIC_PREFIX = "gradient_clipping"
COUNTERS = ("steps_since_log", "clipped_steps", "skipped_steps")
"""The logging counters a checkpoint holds beside the clipper's statistics."""
log = logging.getLogger(__name__)


def _threshold_hint(clipping_type: Any, value: Any) -> str:
    """A hint for a threshold given as a string: YAML reads ``inf`` (and, without omegaconf, ``1e-3``) as
    strings."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isinf(number):
        return f"; write it as a number, not a string (YAML: {number!r})"
    rule = RULES.get(clipping_type) if isinstance(clipping_type, str) else None
    if rule is not None and not rule.threshold_may_be_inf:
        return f"; YAML reads inf as a string, and clipping_type={clipping_type!r} needs a finite threshold"
    return "; YAML reads inf as a string: write .inf"


def _handles_after_train_batch(callback: Callback) -> bool:
    """Whether a callback from outside Composer runs code at ``AFTER_TRAIN_BATCH`` (Composer's own only read
    there)."""
    cls = type(callback)
    return not cls.__module__.startswith("composer.") and (
        cls.after_train_batch is not Callback.after_train_batch or cls.run_event is not Callback.run_event
    )


class GradClipAlgo(Algorithm):
    """Clip the gradients once per optimizer step inside a Composer ``Trainer`` and log what was done.

    It runs at ``Event.AFTER_TRAIN_BATCH``: after the backward pass of every microbatch, the DDP
    all-reduce and the fp16 GradScaler's unscaling, right before ``optimizer.step()``. With gradient
    accumulation it therefore clips the accumulated grads of the whole batch, once.

    Args:
        clipping_type: one of ``gradclip_algo.CLIPPING_TYPES`` (``'norm'``, ``'value'``, ``'adaptive'``, ...).
        clipping_threshold: λ > 0, as in :class:`~gradclip_algo.GradientClipper`.
        log_interval: log every ``log_interval`` optimizer steps: an integer >= 1, or Composer's time string
            in batches (``'10ba'``; other units are refused).
        log_layer_norms: ``None`` (default) or k >= 1: on logging steps also log the pre-clip L2 grad norm
            of the k largest parameters and of every block (see :mod:`gradclip_algo.layer_norms`).
        **options: the options of :class:`~gradclip_algo.GradientClipper`: the rule's own (``norm_type``,
            ``eps``, ...) and the common ones (``exclude``, ``nonfinite``, ...). ``exclude`` globs match the
            names of ``state.model.named_parameters()``, e.g. ``module.fc.weight`` in a
            ``ComposerClassifier``; a leading ``*`` keeps a glob working under wrappers that add prefixes.

    Every bad value or key raises here, before any training step, naming the class: an unknown key with
    the closest allowed one and the list of all of them (``TypeError``), a missing ``clipping_threshold``
    with the near-miss key given instead, a threshold written ``inf`` in YAML (a string) with ``.inf``.
    Under fp16 AMP (``precision='amp_fp16'``) Composer's GradScaler already skips every step whose grads
    hold inf or NaN, so ``nonfinite`` is treated as ``'propagate'`` there (a warning says so once if
    another mode was set).

    Clipping runs at ``Event.AFTER_TRAIN_BATCH``; the metrics of that step are logged with
    ``Logger.log_metrics`` at the following ``Event.BATCH_END`` when ``state.timestamp.batch`` (which then
    counts the batch just trained) is a multiple of ``log_interval``: batches k, 2k, ... with k =
    ``log_interval``, the batches and step numbers of Composer's ``console_log_interval`` and
    ``OptimizerMonitor(batch_log_interval=k)``:

    - ``gradient_clipping/grad_norm``, ``gradient_clipping/clipped_grad_norm``,
      ``gradient_clipping/clipped_fraction``: the :class:`~gradclip_algo.ClipStats` of that step.
    - ``gradient_clipping/clipped_steps_fraction``: share of the steps since the previous log (this one
      included) whose ``clipped_fraction`` was > 0 (a skipped step counts as clipped).
    - ``gradient_clipping/skipped_steps``: how many of those steps were skipped: by ``nonfinite='skip'``
      or ``skip_spikes``, or under fp16 AMP by the GradScaler (counted where the grad norm was inf or NaN).

    With ``log_layer_norms=k``, also (pre-clip, with Composer ``OptimizerMonitor``'s names under this
    prefix): ``gradient_clipping/l2_norm/grad/<parameter name>`` for the k largest and
    ``gradient_clipping/l2_norm/grad_block/<block>`` for every block; ``last_layer_norms`` holds the
    latest :class:`~gradclip_algo.layer_norms.LayerGradNorms`. Other steps do not compute them.

    ``fold_into_optimizer`` (default ``True``): hand the clipping to ``optimizer.step()`` where that computes
    exactly what clipping the grads computes (:mod:`gradclip_algo.folding`): every optimizer of the Trainer
    is one of torch's fused optimizers (``fused=True``), no fp16 AMP (its GradScaler owns ``grad_scale``),
    and nothing else may act on the grads between this algorithm and the step: no other algorithm that
    matches ``Event.AFTER_TRAIN_BATCH`` (Composer's ``GradientClipping`` included, in either order) and no
    callback outside Composer that handles that event. The norm-based types then hand their factor to the
    step as its ``grad_scale`` and skips become its ``found_inf``, so clipping costs one read of the grads
    and skipping no host sync; callbacks that read ``.grad`` before the step see the unclipped grads.
    Where it does not fold, ``fold_why_not`` says why (logged once at INFO level). ``False`` never folds.

    Steps that are not logged do not synchronise with the device (the counters stay device tensors) unless
    an option needs it (``nonfinite='error'``; ``nonfinite='skip'`` and ``skip_spikes`` where not folded).
    Nor do they measure what only the logged metrics need: with ``log_interval`` > 1, ``'value'`` clipping
    measures on the other steps only whether it clipped anything (``with_stats='clipped'``: ``max|g| > λ``,
    taken in the clamping pass, in place of its two norms and count), which ``clipped_steps_fraction``
    counts; under fp16 AMP every step is measured. ``stats_every_step=True`` measures every step fully.
    ``last_stats`` holds the latest ``ClipStats`` for callbacks (on a step measured only for its clipped
    flag: ``clipped_fraction`` 1.0 or 0.0 and NaN norms). ``state_dict()`` holds the clipper's
    statistics and the logging counters as tensors and plain Python values. ``required_on_load()`` stays
    ``False``: clipping changes no module, so a checkpoint loads with or without this algorithm.
    """

    def __init__(
        self,
        clipping_type: str = REQUIRED,
        clipping_threshold: float = REQUIRED,
        log_interval: int = 1,
        log_layer_norms: int | None = None,
        fold_into_optimizer: bool = True,
        stats_every_step: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        required = {"clipping_type": clipping_type, "clipping_threshold": clipping_threshold}
        check_keys(options, [name for name, value in required.items() if value is REQUIRED])
        try:
            self.clipper = GradientClipper(clipping_type, clipping_threshold, **options)
            self.log_interval = check_batches("log_interval", log_interval, 1)
            self.log_layer_norms = (
                None if log_layer_norms is None else check_int("log_layer_norms", log_layer_norms, 1)
            )
            self.fold_into_optimizer = check_bool("fold_into_optimizer", fold_into_optimizer)
            self.stats_every_step = check_bool("stats_every_step", stats_every_step)
        except (TypeError, ValueError) as err:
            hint = (
                _threshold_hint(clipping_type, clipping_threshold) if "clipping_threshold" in str(err) else ""
            )
            raise type(err)(f"{NAME}: {err}{hint}") from err
        self.last_layer_norms: LayerGradNorms | None = None
        self.options = options
        self.nonfinite = self.clipper.nonfinite
        self.last_stats: ClipStats | None = None
        self._pending: ClipStats | None = None
        self._pending_layer_norms: LayerGradNorms | None = None
        self._warned_fp16 = False
        self.fold_why_not = ""
        """Why the latest step was not folded into the optimizers (``""``: it was, or none has run)."""
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._steps_since_log = 0
        self._clipped_steps: int | Tensor = 0
        self._skipped_steps: int | Tensor = 0

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_TRAIN_BATCH, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            # the step hooks go in before the first step, whose closure runs the first clip
            if self._fold_targets(state, state.precision == Precision.AMP_FP16):
                prepare_folding(state.optimizers)
        elif event == Event.BATCH_END:
            self._log_pending(state, logger)
        else:
            self._clip_step(state)

    def _log_pending(self, state: State, logger: Logger) -> None:
        """BATCH_END: the timestamp now counts the batch just trained, as Composer's console_log_interval
        and OptimizerMonitor read it: batches k, 2k, ... are logged, with the same step numbers."""
        if self._pending is not None and state.timestamp.batch.value % self.log_interval == 0:
            logger.log_metrics(self._metrics(self._pending))
            if self._pending_layer_norms is not None:
                logger.log_metrics(self._layer_norm_metrics(self._pending_layer_norms))
            self._reset_counters()
        self._pending = self._pending_layer_norms = None

    def _clip_step(self, state: State) -> None:
        """AFTER_TRAIN_BATCH: clip, and keep the stats (and layer norms) for BATCH_END to log."""
        batch = state.timestamp.batch.value
        fp16 = state.precision == Precision.AMP_FP16
        self._set_nonfinite_mode(fp16)
        logs = (batch + 1) % self.log_interval == 0  # BATCH_END's timestamp will count this batch
        layer_norms = self._layer_norms(state, logs)  # before clipping, on logging steps only
        with_stats = True if logs or fp16 or self.stats_every_step else "clipped"
        try:
            stats = self.clipper(state.model, with_stats, fold_into=self._fold_targets(state, fp16))
        except NonFiniteGradError as err:
            raise NonFiniteGradError(f"batch {batch}: {err}", err.param_name) from err
        assert stats is not None  # with_stats is never False here
        self.last_stats = stats
        self._count(stats, fp16)
        self._pending = stats
        self._pending_layer_norms = layer_norms

    def _count(self, stats: ClipStats, fp16: bool) -> None:
        """Add a step to the logging counters, on the device (no host sync)."""
        self._steps_since_log += 1
        self._clipped_steps = self._clipped_steps + (stats.clipped_fraction > 0).to(torch.int64)
        if isinstance(stats.skipped, Tensor):  # folded into the optimizers' found_inf
            self._skipped_steps = self._skipped_steps + stats.skipped.to(torch.int64)
        elif stats.skipped:
            self._skipped_steps = self._skipped_steps + 1
        elif fp16:  # the GradScaler skips the step when a grad is inf or NaN
            self._skipped_steps = self._skipped_steps + (~torch.isfinite(stats.grad_norm)).to(torch.int64)

    def _fold_targets(self, state: State, fp16: bool) -> tuple[Optimizer, ...]:
        """The optimizers to fold into: all of the Trainer's where folding is exact (see the class
        docstring), else none, with the reason in ``fold_why_not``."""
        why_not = self._fold_why_not(state, fp16)
        if why_not and why_not != self.fold_why_not and self.fold_into_optimizer:
            log.info("%s: the clipping is not folded into the optimizer step: %s", NAME, why_not)
        self.fold_why_not = why_not
        return () if why_not else tuple(state.optimizers)

    def _fold_why_not(self, state: State, fp16: bool) -> str:
        if not self.fold_into_optimizer:
            return "fold_into_optimizer=False"
        if fp16:
            return "precision='amp_fp16' (its GradScaler owns grad_scale and found_inf)"
        unsupported = [type(opt).__name__ for opt in state.optimizers if not supports_folding(opt)]
        if unsupported:
            return f"{', '.join(unsupported)} reads no grad_scale/found_inf (use fused=True)"
        # Composer orders the algorithms of an event by passes this algorithm does not see, so any other
        # algorithm of AFTER_TRAIN_BATCH may run after it
        others = [
            type(alg).__name__
            for alg in state.algorithms
            if alg is not self and alg.match(Event.AFTER_TRAIN_BATCH, state)
        ]
        if others:
            return (
                f"{', '.join(others)} also runs at AFTER_TRAIN_BATCH and may change the grads after the clip"
            )
        callbacks = [type(cb).__name__ for cb in state.callbacks if _handles_after_train_batch(cb)]
        if callbacks:
            return f"callback {', '.join(callbacks)} handles AFTER_TRAIN_BATCH and may change the grads"
        return ""

    def _layer_norms(self, state: State, logs: bool) -> LayerGradNorms | None:
        """Per-parameter grad norms (device tensors) when ``log_layer_norms`` is set and this step logs."""
        if self.log_layer_norms is None or not logs:
            return None
        self.last_layer_norms = grad_norms_by_name(state.model)
        return self.last_layer_norms

    def _layer_norm_metrics(self, layer_norms: LayerGradNorms) -> dict[str, float]:
        """``log_layer_norms`` top parameters and every block, read in one transfer."""
        metrics = norm_metrics(layer_norms, self.log_layer_norms)
        return {f"{METRIC_PREFIX}/{name}": value for name, value in metrics.items()}

    def _set_nonfinite_mode(self, fp16: bool) -> None:
        """Under fp16 AMP the GradScaler handles inf/NaN grads, so the clipper only propagates them."""
        if fp16 and self.nonfinite != "propagate" and not self._warned_fp16:
            warn_at_caller(
                f"{NAME}: nonfinite={self.nonfinite!r} is treated as 'propagate' under "
                "precision='amp_fp16': the GradScaler already skips steps with inf/NaN gradients"
            )
            self._warned_fp16 = True
        self.clipper.nonfinite = "propagate" if fp16 else self.nonfinite

    def _metrics(self, stats: ClipStats) -> dict[str, float]:
        """The logged values, read from the device in one transfer."""
        device = stats.grad_norm.device
        values = (
            stats.grad_norm,
            stats.clipped_grad_norm,
            stats.clipped_fraction,
            self._clipped_steps,
            self._skipped_steps,
        )
        grad_norm, clipped_grad_norm, clipped_fraction, clipped_steps, skipped_steps = torch.stack(
            [torch.as_tensor(value, dtype=torch.float32, device=device) for value in values]
        ).tolist()
        return {
            f"{METRIC_PREFIX}/grad_norm": grad_norm,
            f"{METRIC_PREFIX}/clipped_grad_norm": clipped_grad_norm,
            f"{METRIC_PREFIX}/clipped_fraction": clipped_fraction,
            f"{METRIC_PREFIX}/clipped_steps_fraction": clipped_steps / self._steps_since_log,
            f"{METRIC_PREFIX}/skipped_steps": int(skipped_steps),
        }

    def state_dict(self) -> dict[str, Any]:
        """The clipper's statistics and the logging counters :data:`COUNTERS` (reading them syncs once)."""
        return {
            "repr": repr(self),
            "clipper": self.clipper.state_dict(),
            "steps_since_log": self._steps_since_log,
            "clipped_steps": int(self._clipped_steps),
            "skipped_steps": int(self._skipped_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, all or nothing: the counters and the clipper's
        statistics are checked (keys, types, ranges, values) before anything is replaced."""
        if not isinstance(state, Mapping):
            raise ValueError(f"{NAME}: state: expected a mapping, got {state!r}")
        if "clipper" not in state:
            warn_at_caller(f"{NAME}: the checkpoint holds no gradclip_algo state ({state!r}); starting fresh")
            return
        counters = _checked_counters(state)
        try:
            self.clipper.load_state_dict(state["clipper"])
        except ValueError as err:
            raise ValueError(f"{NAME}: {err}") from err
        self._steps_since_log = counters["steps_since_log"]
        self._clipped_steps = counters["clipped_steps"]
        self._skipped_steps = counters["skipped_steps"]

    def __repr__(self) -> str:
        options = "".join(f", {name}={value!r}" for name, value in self.options.items())
        return (
            f"{type(self).__name__}(clipping_type={self.clipper.clipping_type!r}, "
            f"clipping_threshold={self.clipper.clipping_threshold!r}, "
            f"log_interval={self.log_interval!r}"
            + ("" if self.log_layer_norms is None else f", log_layer_norms={self.log_layer_norms!r}")
            + ("" if self.fold_into_optimizer else ", fold_into_optimizer=False")
            + (", stats_every_step=True" if self.stats_every_step else "")
            + f"{options})"
        )


def _checked_counters(state: Mapping[str, Any]) -> dict[str, int]:
    """The :data:`COUNTERS` of ``state``, each an integer >= 0, with no more clipped or skipped steps than
    steps since the last log; ``ValueError`` naming the key otherwise."""
    counters = {}
    for key in COUNTERS:
        if key not in state:
            expected = ", ".join(("clipper", *COUNTERS))
            raise ValueError(f"{NAME}: state: missing key {key!r}; expected {expected}")
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{NAME}: state.{key}: expected an integer >= 0, got {value!r}")
        counters[key] = value
    for key in ("clipped_steps", "skipped_steps"):
        if counters[key] > counters["steps_since_log"]:
            raise ValueError(
                f"{NAME}: state.{key}: {counters[key]} is more than the {counters['steps_since_log']} "
                "steps since the last log (state.steps_since_log)"
            )
    return counters
