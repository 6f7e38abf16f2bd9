"""What ``gradclip-calibrate`` computes: measurements of an unclipped run and a setting per clipping type.

It trains ``N`` steps of a ``gradclip-train`` run config *without* clipping (its ``algorithms:`` block is
set aside), records per step the loss, the global L2 grad norm, the largest absolute grad element and AGC's
per-unit ratios ``‖G_u‖ / max(‖W_u‖, 1e-3)``, and derives a recommended setting for every clipping type with
its reasoning. A run that diverges (a norm or loss that is inf or NaN, or a loss that grows by orders of
magnitude while staying finite) recommends nothing.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from matplotlib.figure import Figure
from torch import Tensor

from gradclip_algo.config import REGISTRY_NAME
from gradclip_algo.kernels import unit_norms
from gradclip_algo.norms import get_total_norm
from gradclip_algo.rules.adagc import AdaGCOptions
from gradclip_algo.rules.adaptive import AdaptiveOptions
from gradclip_algo.rules.quantile import QuantileOptions
from gradclip_algo.rules.zscore import ZScoreOptions
from gradclip_algo.train.interrupt import Interrupted, raise_if_requested, signal_name, stop_signals
from gradclip_algo.train.run import build_parts, make_trainer
from gradclip_algo.train.run_config import RunConfig
from gradclip_algo.train.run_end import INTERRUPTED, fit

MIN_STEPS = 2  # a standard deviation needs two norms
QUANTILE_LEVELS = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
AGC_EPS = AdaptiveOptions().eps
AGC_PERCENTILE = 99.0
DIVERGENCE_FACTOR = 100.0
"""A loss whose last tenth of steps is this many times its first tenth (medians) is diverging."""
SUMMARY_PERCENTILES = (10.0, 50.0, 90.0, 99.0)


def _loss_value(loss: Any, device: torch.device) -> Tensor:
    """The training loss of a step as a 0-d float64 tensor (a dict or sequence of losses is summed)."""
    if isinstance(loss, dict):
        loss = list(loss.values())
    if isinstance(loss, (list, tuple)):
        loss = sum(loss)
    if not isinstance(loss, Tensor):
        return torch.tensor(math.nan, dtype=torch.float64, device=device)
    return loss.detach().to(device, torch.float64).sum()


class CalibrationRecorder(Callback):
    """At ``Event.AFTER_TRAIN_BATCH`` (where clipping would run) keeps, per step, as device tensors:
    the global L2 grad norm, the largest ``|g|``, the global weight norm, the loss, and 101 quantiles (0 %,
    1 %, …, 100 %) of AGC's per-unit ratios; they are read from the device once, by :meth:`measurements`."""

    def __init__(self) -> None:
        self._norms: list[Tensor] = []
        self._ratio_quantiles: list[Tensor] = []

    def after_train_batch(self, state: State, logger: Logger) -> None:
        params = [p for p in state.model.parameters() if p.grad is not None]
        grads, weights = [p.grad for p in params], [p.detach() for p in params]
        device = grads[0].device
        self._norms.append(
            torch.stack(
                [
                    get_total_norm(grads, 2.0, device).double(),
                    get_total_norm(grads, math.inf, device).double(),
                    get_total_norm(weights).to(device, torch.float64),
                    _loss_value(state.loss, device),
                ]
            )
        )
        ratios = torch.cat(
            [
                (unit_norms(g) / unit_norms(w).clamp(min=AGC_EPS)).flatten().to(device, torch.float64)
                for g, w in zip(grads, weights, strict=True)
            ]
        )
        self._ratio_quantiles.append(torch.quantile(ratios, QUANTILE_LEVELS.to(device)))

    def measurements(self) -> Measurements:
        norms = torch.stack(self._norms).double().cpu()
        return Measurements(
            grad_norms=norms[:, 0],
            max_abs_grads=norms[:, 1],
            weight_norms=norms[:, 2],
            losses=norms[:, 3],
            unit_ratio_quantiles=torch.stack(self._ratio_quantiles).cpu(),
        )


@dataclass(frozen=True)
class Measurements:
    """Per-step values of an unclipped run (float64, one row per optimizer step)."""

    grad_norms: Tensor
    max_abs_grads: Tensor
    weight_norms: Tensor
    unit_ratio_quantiles: Tensor  # (steps, 101): each step's ratio distribution, by its quantiles
    losses: Tensor | None = None  # the training loss per step, where it was recorded

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            header = ["step", "grad_norm", "max_abs_grad", "weight_norm"]
            columns = [self.grad_norms, self.max_abs_grads, self.weight_norms]
            if self.losses is not None:
                header.append("loss")
                columns.append(self.losses)
            writer.writerow(header)
            rows = torch.stack(columns, dim=1).tolist()
            for step, row in enumerate(rows, start=1):
                writer.writerow([step, *row])


@dataclass(frozen=True)
class Statistics:
    """Statistics of a series of finite values (the standard deviation with ddof 1)."""

    count: int
    mean: float
    std: float
    percentiles: dict[float, float]
    max: float

    @classmethod
    def of(cls, values: Tensor) -> Statistics:
        levels = torch.tensor(SUMMARY_PERCENTILES, dtype=torch.float64) / 100
        return cls(
            count=values.numel(),
            mean=values.mean().item(),
            std=values.std().item(),
            percentiles=dict(zip(SUMMARY_PERCENTILES, torch.quantile(values, levels).tolist(), strict=True)),
            max=values.max().item(),
        )

    @property
    def median(self) -> float:
        return self.percentiles[50.0]

    def describe(self) -> str:
        parts = [f"mean {self.mean:.4g}", f"std {self.std:.4g}", f"median {self.median:.4g}"]
        parts += [f"p{p:g} {value:.4g}" for p, value in self.percentiles.items() if p != 50.0]
        parts.append(f"max {self.max:.4g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Recommendation:
    """One clipping type's recommended setting and why."""

    clipping_type: str
    clipping_threshold: float
    options: dict[str, Any]
    reason: str

    def algorithms_block(self) -> dict[str, Any]:
        settings = {"clipping_type": self.clipping_type, "clipping_threshold": self.clipping_threshold}
        return {"algorithms": {REGISTRY_NAME: {**settings, **self.options}}}

    def overrides(self) -> str:
        """The same setting as ``gradclip-train`` overrides."""
        settings = {"clipping_type": self.clipping_type, "clipping_threshold": self.clipping_threshold}
        return " ".join(
            f"algorithms.{REGISTRY_NAME}.{key}={value}" for key, value in {**settings, **self.options}.items()
        )


class CalibrationError(RuntimeError):
    """The calibration run cannot give recommendations (it diverged)."""


def _rounded(value: float) -> float:
    """Three significant digits: thresholds are not that precise, and a config should read well."""
    return float(f"{value:.3g}")


def check_not_diverging(measured: Measurements) -> None:
    """``CalibrationError`` saying why, if the run diverged.

    Inf or NaN: the first step with a non-finite norm. Finite: the median loss of the last tenth of the
    steps (at least one) is ``DIVERGENCE_FACTOR`` times that of the first tenth or more: the loss grows
    by orders of magnitude, as when each too-large step makes the next gradient larger.
    """
    norms, losses = measured.grad_norms, measured.losses
    advice = (
        "thresholds measured on a diverging run mean nothing: calibrate where the run is stable, e.g. with a "
        "lower optimizer.lr"
    )
    nonfinite = (~torch.isfinite(norms)).nonzero()
    if nonfinite.numel():
        step = nonfinite[0].item() + 1
        largest = norms[torch.isfinite(norms)]
        raise CalibrationError(
            f"the unclipped run diverged: its gradient norm was inf or NaN from step {step} on (step 1: "
            f"{norms[0].item():.3g}, largest finite: "
            f"{largest.max().item() if largest.numel() else math.nan:.3g}); {advice}"
        )
    if losses is None or not bool(torch.isfinite(losses).all()):
        return  # a loss that is not a number (NaN where no loss was seen) says nothing here
    window = max(1, losses.numel() // 10)
    first, last = losses[:window].median().item(), losses[-window:].median().item()
    if first > 0 and last >= DIVERGENCE_FACTOR * first:
        steps = losses.numel()
        raise CalibrationError(
            f"the unclipped run diverged while staying finite: its loss grew {last / first:.3g}-fold, from "
            f"{first:.3g} (median of steps 1-{window}) to {last:.3g} (steps {steps - window + 1}-{steps}), and "
            f"its gradient norm from {norms[0].item():.3g} to {norms.max().item():.3g}; {advice}"
        )


def recommend(measured: Measurements) -> list[Recommendation]:
    """A setting for every clipping type, from the measurements of an unclipped run.

    Raises:
        CalibrationError: the run diverged (a norm was inf or NaN, or the loss grew by orders of
            magnitude while staying finite): its numbers would recommend nothing.
    """
    check_not_diverging(measured)
    norms = Statistics.of(measured.grad_norms)
    largest = Statistics.of(measured.max_abs_grads)
    agc = torch.quantile(measured.unit_ratio_quantiles.flatten(), AGC_PERCENTILE / 100).item()
    ceiling = _rounded(norms.max)
    ceiling_reason = (
        f"clipping_threshold {ceiling:g}, the largest norm of the unclipped run, is a ceiling that steps like "
        "those never reach; it bounds a spike before the statistics exist"
    )
    quantile, zscore, adagc = QuantileOptions(), ZScoreOptions(), AdaGCOptions()
    percentile = torch.quantile(measured.grad_norms, quantile.percentile / 100).item()
    return [
        Recommendation(
            "norm",
            _rounded(norms.mean),
            {},
            f"the mean norm over {norms.count} steps: Pascanu et al. (2013) set the threshold from the average "
            f"norm over many updates and found half to ten times it to work; the median ({norms.median:.3g}) "
            f"and p90 ({norms.percentiles[90.0]:.3g}) bound a gentler choice",
        ),
        Recommendation(
            "value",
            _rounded(largest.median),
            {},
            "the median over steps of the largest |g| element: a typical step loses at most its few largest "
            "elements, a spike is clamped",
        ),
        Recommendation(
            "adaptive",
            _rounded(agc),
            {},
            f"the p{AGC_PERCENTILE:g} of the per-unit ratios ||G_u|| / max(||W_u||, {AGC_EPS:g}) over all steps: about "
            f"{100 - AGC_PERCENTILE:g} % of unit updates of an unclipped run get clipped (Brock et al. 2021 "
            "used 0.01 at batch 1024-4096 and larger values for small batches)",
        ),
        Recommendation(
            "quantile",
            ceiling,
            quantile.as_dict(),
            f"AutoClip's p = {quantile.percentile:g} over the last {quantile.window} norms (its paper's choice; "
            f"over this run that is {percentile:.3g}); {ceiling_reason}",
        ),
        Recommendation(
            "zscore",
            ceiling,
            zscore.as_dict(),
            f"ZClip's defaults (alpha {zscore.alpha:g}, z {zscore.z_threshold:g}, {zscore.warmup_steps} warm-up "
            f"steps); {ceiling_reason} (the warm-up)",
        ),
        Recommendation(
            "adagc",
            ceiling,
            adagc.as_dict(),
            f"AdaGC's defaults (lambda_rel {adagc.relative_threshold:g}, beta {adagc.beta:g}) with "
            f"{adagc.warmup_steps} warm-up steps; {ceiling_reason} (lambda_abs of the warm-up)",
        ),
    ]


def plot_calibration(measured: Measurements, recommendations: Sequence[Recommendation], path: Path) -> None:
    """Norm per step (left) and the histogram of the norms (right), log scales, with the thresholds."""
    norms = measured.grad_norms
    by_type = {r.clipping_type: r.clipping_threshold for r in recommendations}
    p10 = torch.quantile(norms, 0.1).item()
    lines = {
        f"norm: λ = {by_type['norm']:g} (the mean)": by_type["norm"],
        f"ceiling of quantile, zscore, adagc: {by_type['zscore']:g} (the max)": by_type["zscore"],
        f"p10 (AutoClip's percentile): {p10:.3g}": p10,
    }
    figure = Figure(figsize=(11, 4), layout="constrained")
    trajectory, histogram = figure.subplots(1, 2, width_ratios=(2, 1))
    steps = range(1, measured.grad_norms.numel() + 1)
    trajectory.plot(steps, measured.grad_norms.tolist(), lw=0.8, color="C0", label="grad L2 norm")
    low, high = norms.min().item(), norms.max().item()
    bins = torch.logspace(math.log10(low), math.log10(high) + 1e-9, 40).tolist() if low > 0 else 40
    histogram.hist(norms.tolist(), bins=bins, color="C0", alpha=0.7)
    for index, (label, value) in enumerate(lines.items()):
        trajectory.axhline(value, color=f"C{index + 1}", ls=":", lw=1.5, label=label)
        histogram.axvline(value, color=f"C{index + 1}", ls=":", lw=1.5)
    trajectory.set(yscale="log", xlabel="optimizer step", ylabel="gradient L2 norm (no clipping)")
    histogram.set(xscale="log" if low > 0 else "linear", xlabel="gradient L2 norm", ylabel="steps")
    trajectory.legend(loc="best", fontsize="small")
    for axis in (trajectory, histogram):
        axis.grid(True, alpha=0.3)
    figure.suptitle(f"gradient norms of {len(steps)} unclipped steps")
    figure.savefig(path, dpi=110)


def measure(config: RunConfig, steps: int) -> Measurements:
    """Train ``steps`` optimizer steps of ``config`` without clipping and return the measurements (fewer
    where the loss became inf or NaN and ``config.stop_on_nonfinite_loss`` ended the run there).

    Raises:
        Interrupted: after SIGINT or SIGTERM, at the end of a step; nothing is written.
    """
    with stop_signals():
        raise_if_requested()
        parts = build_parts(replace(config, algorithms={}))
        recorder = CalibrationRecorder()
        trainer = make_trainer(
            config, parts, [recorder], evaluate=False, max_duration=f"{steps}ba", progress_bar=False
        )
        end = fit(trainer)
        if end.status == INTERRUPTED and end.signum is not None:
            raise Interrupted(
                end.signum,
                (
                    f"interrupted by {signal_name(end.signum)} after {end.last_step} of {steps} unclipped "
                    "steps: nothing written",
                ),
            )
    return recorder.measurements()
