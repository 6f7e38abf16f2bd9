"""Plots of loss and gradient norm per step, for one run or several side by side (PNG, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from gradclip_algo.train.adding_problem import MEAN_PREDICTOR_MSE
from gradclip_algo.train.metrics import StepRecord, summarize

OFF_CHART = 100.0  # the y axes end at this many times the largest first-step value
SHORT_RUN = 10  # a run this many times shorter than the longest makes the step axis logarithmic
PALETTE = colormaps["tab20"]  # pairs of a dark and a light shade: run i takes colours 2i and 2i + 1


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
    """:func:`draw_runs`, saved as a PNG to ``path``."""
    draw_runs(series, title).savefig(path, dpi=110)


def draw_runs(series: Sequence[PlotSeries], title: str) -> Figure:
    """Training loss (top) and gradient norm before and after clipping (bottom), log scales.

    Each run has a dark and a light shade of one colour: its loss, its norm after clipping and its
    threshold λ are dark, its norm before clipping light and beneath, so the cap at λ shows where the two
    part. A vertical line marks the first step whose loss or norm was inf or NaN; from there on the curve
    is left out, since those values have no place on the axis. Each axis stops at ``OFF_CHART`` times the
    largest first-step value, so a run that explodes leaves the chart at the top instead of squashing the
    others into its bottom row. Where a run ended before a tenth of the longest run's steps (one stopped
    at a non-finite loss), the step axis is logarithmic, so that its steps still take room.
    """
    figure = Figure(figsize=(10, 7), layout="constrained")
    loss_axis, norm_axis = figure.subplots(2, 1, sharex=True)
    for index, run in enumerate(series):
        _draw_run(loss_axis, norm_axis, index, run)
    loss_axis.axhline(MEAN_PREDICTOR_MSE, color="grey", ls=":", lw=1.5, label="predicting the mean (1/6)")
    loss_axis.set(yscale="log", ylabel="training loss (MSE)", title=title)
    norm_axis.set(yscale="log", ylabel="gradient L2 norm", xlabel="optimizer step")
    lengths = [len(run.records) for run in series if run.records]
    if lengths and min(lengths) * SHORT_RUN < max(lengths):
        norm_axis.set_xscale("log")
        norm_axis.set_xlabel("optimizer step (log scale: a run stopped early)")
    for axis, names in ((loss_axis, ("loss",)), (norm_axis, ("grad_norm", "clipped_grad_norm"))):
        _limit(axis, series, names)
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    return figure


def _draw_run(loss_axis: Axes, norm_axis: Axes, index: int, run: PlotSeries) -> None:
    """One run's lines: loss; norm before clipping (light) and, with a threshold, after it and λ (dark)."""
    dark, light = PALETTE(2 * index % PALETTE.N), PALETTE((2 * index + 1) % PALETTE.N)
    steps = [r.step for r in run.records]
    loss_axis.plot(steps, _finite([r.loss for r in run.records]), color=dark, lw=0.7, label=run.label)
    before = _finite([r.grad_norm for r in run.records])
    if run.threshold is None:  # nothing clipped: one norm
        norm_axis.plot(steps, before, color=dark, lw=0.7, label=f"{run.label}: no clipping")
    else:
        norm_axis.plot(steps, before, color=light, lw=1.2, label=f"{run.label}: before clipping")
        after = _finite([r.clipped_grad_norm for r in run.records])
        norm_axis.plot(steps, after, color=dark, lw=0.7, zorder=3, label=f"{run.label}: after clipping")
        norm_axis.axhline(run.threshold, color=dark, ls=":", lw=1.5, label=f"threshold λ = {run.threshold:g}")
    first_nonfinite = summarize(run.records, math.nan).first_nonfinite_step
    if first_nonfinite is not None:
        for axis in (loss_axis, norm_axis):
            axis.axvline(first_nonfinite, color=dark, ls="-.", lw=1.0)
        stopped = ", run stopped" if run.records[-1].step == first_nonfinite else ""
        loss_axis.annotate(
            f"  {run.label}: inf/NaN from step {first_nonfinite}{stopped}",
            (first_nonfinite, 0.92 - 0.06 * index),
            xycoords=("data", "axes fraction"),
            color=dark,
            ha="left",
            va="center",
        )


def _limit(axis: Axes, series: Sequence[PlotSeries], names: tuple[str, ...]) -> None:
    """The y range: from half the smallest positive value to ``OFF_CHART`` times the largest first one."""
    shown = [getattr(r, name) for run in series for r in run.records for name in names]
    first = [getattr(run.records[0], names[0]) for run in series if run.records]
    low = min((v for v in shown if math.isfinite(v) and v > 0), default=math.nan)
    top = max((v for v in first if math.isfinite(v) and v > 0), default=math.nan)
    if math.isfinite(low) and math.isfinite(top):
        axis.set_ylim(low / 2, max(OFF_CHART * top, 2 * low))
