"""``GradientClipping``: the Composer algorithm around :class:`~gradclip_algo.clipper.GradientClipper`."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from composer.core import Algorithm, Event, Precision, State
from composer.loggers import Logger
from torch import Tensor

from gradclip_algo.clipper import GradientClipper
from gradclip_algo.layer_norms import LayerGradNorms, grad_norms_by_name, norm_metrics
from gradclip_algo.nonfinite import NonFiniteGradError
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_int

METRIC_PREFIX = "gradient_clipping"


class GradientClipping(Algorithm):
    """Clip the gradients once per optimizer step inside a Composer ``Trainer`` and log what was done.

    It runs at ``Event.AFTER_TRAIN_BATCH``: after the backward pass of every microbatch, the DDP
    all-reduce and the fp16 GradScaler's unscaling, right before ``optimizer.step()``. With gradient
    accumulation it therefore clips the accumulated grads of the whole batch, once.

    Args:
        clipping_type: one of ``gradclip_algo.CLIPPING_TYPES`` (``'norm'``, ``'value'``, ``'adaptive'``, ...).
        clipping_threshold: λ > 0, as in :class:`~gradclip_algo.GradientClipper`.
        log_interval: log every ``log_interval`` optimizer steps (integer >= 1).
        log_layer_norms: ``None`` (default) or k >= 1: on logging steps also log the pre-clip L2 grad norm
            of the k largest parameters and of every block (see :mod:`gradclip_algo.layer_norms`).
        **options: the options of :class:`~gradclip_algo.GradientClipper`: the rule's own (``norm_type``,
            ``eps``, ...) and the common ones (``exclude``, ``nonfinite``, ...). ``exclude`` globs match the
            names of ``state.model.named_parameters()``, e.g. ``module.fc.weight`` in a
            ``ComposerClassifier``; a leading ``*`` keeps a glob working under wrappers that add prefixes.

    Every bad value raises here, before any training step. Under fp16 AMP (``precision='amp_fp16'``)
    Composer's GradScaler already skips every step whose grads hold inf or NaN, so ``nonfinite`` is
    treated as ``'propagate'`` there (a warning says so once if another mode was set).

    Logged with ``Logger.log_metrics`` on the steps whose ``state.timestamp.batch`` (the number of batches
    trained before this one, which is also the step Composer's logger records) is a multiple of
    ``log_interval``, so the first step is always logged:

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

    Steps that are not logged do not synchronise with the device (the counters stay device tensors) unless
    an option needs it (``nonfinite='error'`` or ``'skip'``, ``skip_spikes``).
    ``last_stats`` holds the latest ``ClipStats`` for callbacks. ``state_dict()`` holds the clipper's
    statistics and the logging counters as tensors and plain Python values. ``required_on_load()`` stays
    ``False``: clipping changes no module, so a checkpoint loads with or without this algorithm.
    """

    def __init__(
        self,
        clipping_type: str,
        clipping_threshold: float,
        log_interval: int = 1,
        log_layer_norms: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.log_layer_norms = (
            None if log_layer_norms is None else check_int("log_layer_norms", log_layer_norms, 1)
        )
        self.last_layer_norms: LayerGradNorms | None = None
        self.clipper = GradientClipper(clipping_type, clipping_threshold, **options)
        self.log_interval = check_int("log_interval", log_interval, minimum=1)
        self.options = options
        self.nonfinite = self.clipper.nonfinite
        self.last_stats: ClipStats | None = None
        self._warned_fp16 = False
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._steps_since_log = 0
        self._clipped_steps: int | Tensor = 0
        self._skipped_steps: int | Tensor = 0

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_TRAIN_BATCH

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.timestamp.batch.value
        fp16 = state.precision == Precision.AMP_FP16
        self._set_nonfinite_mode(fp16)
        layer_norms = self._layer_norms(state, batch)  # before clipping, on logging steps only
        try:
            stats = self.clipper(state.model)
        except NonFiniteGradError as err:
            raise NonFiniteGradError(f"batch {batch}: {err}", err.param_name) from err
        self.last_stats = stats
        self._steps_since_log += 1
        self._clipped_steps = self._clipped_steps + (stats.clipped_fraction > 0).to(torch.int64)
        if stats.skipped:
            self._skipped_steps = self._skipped_steps + 1
        elif fp16:  # the GradScaler skips the step when a grad is inf or NaN
            self._skipped_steps = self._skipped_steps + (~torch.isfinite(stats.grad_norm)).to(torch.int64)
        if batch % self.log_interval == 0:
            logger.log_metrics(self._metrics(stats))
            if layer_norms is not None:
                logger.log_metrics(self._layer_norm_metrics(layer_norms))
            self._reset_counters()

    def _layer_norms(self, state: State, batch: int) -> LayerGradNorms | None:
        """Per-parameter grad norms (device tensors) when ``log_layer_norms`` is set and this step logs."""
        if self.log_layer_norms is None or batch % self.log_interval != 0:
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
            warnings.warn(
                f"GradientClipping: nonfinite={self.nonfinite!r} is treated as 'propagate' under "
                "precision='amp_fp16': the GradScaler already skips steps with inf/NaN gradients",
                stacklevel=2,
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
        """The clipper's statistics and the logging counters (reading the counters syncs once)."""
        return {
            "repr": repr(self),
            "clipper": self.clipper.state_dict(),
            "steps_since_log": self._steps_since_log,
            "clipped_steps": int(self._clipped_steps),
            "skipped_steps": int(self._skipped_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "clipper" not in state:
            # Composer's own GradientClipping has the same class name and saves only its repr.
            warnings.warn(
                f"GradientClipping: the checkpoint holds no gradclip_algo state ({state!r}); starting fresh",
                stacklevel=2,
            )
            return
        self.clipper.load_state_dict(state["clipper"])
        self._steps_since_log = state["steps_since_log"]
        self._clipped_steps = state["clipped_steps"]
        self._skipped_steps = state["skipped_steps"]

    def __repr__(self) -> str:
        options = "".join(f", {name}={value!r}" for name, value in self.options.items())
        return (
            f"{type(self).__name__}(clipping_type={self.clipper.clipping_type!r}, "
            f"clipping_threshold={self.clipper.clipping_threshold!r}, "
            f"log_interval={self.log_interval!r}"
            + ("" if self.log_layer_norms is None else f", log_layer_norms={self.log_layer_norms!r}")
            + f"{options})"
        )
