"""Plots of loss and gradient norm per step, for one run or several side by side (PNG, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from gradclip_algo.train.adding_problem import MEAN_PREDICTOR_MSE
from gradclip_algo.train.metrics import StepRecord, summarize

OFF_CHART = 100.0  # the y axes end at this many times the largest first-step value


@dataclass(frozen=True)
class PlotSeries:
    """One run's curves; ``threshold`` is its norm-clipping threshold λ, drawn as a line (``None``: none)."""

    label: str
    records: Sequence[StepRecord]
    threshold: float | None


def _finite(values: list[float]) -> list[float]:
    """inf and NaN as NaN, which matplotlib leaves out of lines and axis limits."""
    return [value if math.isfinite(value) else math.nan for value in values]


def plot_runs(series: Sequence[PlotSeries], path: Path, title: str) -> None:
    """Training loss (top) and gradient norm before and after clipping (bottom), log scales, to ``path``.

    A vertical line marks the first step whose loss or norm was inf or NaN; from there on the curve is
    left out, since those values have no place on the axis. Each axis stops at ``OFF_CHART`` times the
    largest first-step value, so a run that explodes leaves the chart at the top instead of squashing the
    others into its bottom row.
    """
    figure = Figure(figsize=(10, 7), layout="constrained")
    loss_axis, norm_axis = figure.subplots(2, 1, sharex=True)
    for index, run in enumerate(series):
        color = f"C{index}"
        steps = [r.step for r in run.records]
        loss_axis.plot(steps, _finite([r.loss for r in run.records]), color=color, lw=0.7, label=run.label)
        norm_axis.plot(
            steps,
            _finite([r.grad_norm for r in run.records]),
            color=color,
            lw=0.7,
            label=f"{run.label}: before",
        )
        if run.threshold is not None:
            norm_axis.plot(
                steps,
                _finite([r.clipped_grad_norm for r in run.records]),
                color=color,
                lw=0.7,
                ls="--",
                label=f"{run.label}: after clipping",
            )
            norm_axis.axhline(
                run.threshold, color=color, ls=":", lw=1.5, label=f"threshold λ = {run.threshold:g}"
            )
        first_nonfinite = summarize(run.records, math.nan).first_nonfinite_step
        if first_nonfinite is not None:
            for axis in (loss_axis, norm_axis):
                axis.axvline(first_nonfinite, color=color, ls="-.", lw=1.0)
            loss_axis.annotate(
                f"  {run.label}: inf/NaN from step {first_nonfinite}",
                (first_nonfinite, 0.92 - 0.06 * index),
                xycoords=("data", "axes fraction"),
                color=color,
                ha="left",
                va="center",
            )
    loss_axis.axhline(MEAN_PREDICTOR_MSE, color="grey", ls=":", lw=1.5, label="predicting the mean (1/6)")
    loss_axis.set(yscale="log", ylabel="training loss (MSE)", title=title)
    norm_axis.set(yscale="log", ylabel="gradient L2 norm", xlabel="optimizer step")
    for axis, names in ((loss_axis, ("loss",)), (norm_axis, ("grad_norm", "clipped_grad_norm"))):
        shown = [getattr(r, name) for run in series for r in run.records for name in names]
        first = [getattr(run.records[0], names[0]) for run in series if run.records]
        low = min((v for v in shown if math.isfinite(v) and v > 0), default=math.nan)
        top = max((v for v in first if math.isfinite(v) and v > 0), default=math.nan)
        if math.isfinite(low) and math.isfinite(top):
            axis.set_ylim(low / 2, max(OFF_CHART * top, 2 * low))
    for axis in (loss_axis, norm_axis):
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    figure.savefig(path, dpi=110)
