"""Plots of language-model runs: training loss, grad norm before and after clipping with the threshold,
and per-layer grad norms as a heatmap (layers by steps). PNG files, no display needed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from gradclip_algo.train.lm_results import LanguageModelResult
from gradclip_algo.train.loss_spikes import spike_steps


def _finite(values: Sequence[float]) -> list[float]:
    return [value if math.isfinite(value) else math.nan for value in values]


def _short(name: str) -> str:
    return name.removeprefix("net.").removesuffix(".weight").replace(".bias", " b")


def draw_loss(axis: Axes, result: LanguageModelResult, color: str, label: str) -> None:
    """Training loss per step, spike steps marked, evaluation losses as dots."""
    steps = [r.step for r in result.records]
    losses = [r.loss for r in result.records]
    axis.plot(steps, _finite(losses), color=color, lw=0.7, label=label)
    spikes = spike_steps(losses)
    axis.plot(spikes, _finite([losses[s - 1] for s in spikes]), "v", color=color, ms=4, ls="none")
    if result.evals:
        eval_steps, eval_losses = zip(*result.evals, strict=True)
        axis.plot(eval_steps, _finite(eval_losses), "o", color=color, ms=3, mfc="white")


def draw_norms(axis: Axes, result: LanguageModelResult, color: str) -> None:
    """Pre-clip (light) and post-clip (dark) global norm, the threshold (dashed), the skip limit (dotted)."""
    steps = [r.step for r in result.records]
    axis.plot(
        steps, _finite([r.grad_norm for r in result.records]), color="0.6", lw=0.7, label="before clipping"
    )
    axis.plot(
        steps, _finite([r.clipped_grad_norm for r in result.records]), color=color, lw=0.7, label="after"
    )
    thresholds = [r.threshold for r in result.records]
    if any(math.isfinite(t) for t in thresholds):
        axis.plot(steps, _finite(thresholds), color="k", ls="--", lw=1.0, label="threshold")
    limits = [r.skip_limit for r in result.records]
    if any(math.isfinite(t) for t in limits):
        axis.plot(steps, _finite(limits), color="C3", ls=":", lw=1.2, label="skip limit")
    skipped = [r.step for r in result.records if r.skipped]
    if skipped:
        axis.plot(skipped, _finite([result.records[s - 1].grad_norm for s in skipped]), "x", color="C3", ms=5)
    axis.set(yscale="log")
    axis.grid(True, alpha=0.3)


def draw_heatmap(axis: Axes, result: LanguageModelResult, norm: LogNorm) -> object:
    """Per-parameter grad L2 norms, one row per parameter (first at the top), one column per step."""
    rows = [list(column) for column in zip(*result.layer_rows, strict=True)] if result.layer_rows else []
    image = axis.imshow(
        [[v if math.isfinite(v) and v > 0 else math.nan for v in row] for row in rows],
        aspect="auto",
        interpolation="nearest",
        norm=norm,
        cmap="magma",
        extent=(0.5, len(result.layer_rows) + 0.5, len(rows) - 0.5, -0.5),
    )
    axis.set_yticks(range(len(result.layer_names)), [_short(n) for n in result.layer_names], fontsize=5)
    return image


def _color_norm(results: Sequence[LanguageModelResult]) -> LogNorm:
    values = [v for r in results for row in r.layer_rows for v in row if math.isfinite(v) and v > 0]
    return LogNorm(vmin=min(values, default=1e-3), vmax=max(values, default=1.0))


def plot_lm_run(result: LanguageModelResult, path: Path) -> None:
    """One run: loss, global norms with the threshold, per-layer heatmap."""
    figure = Figure(figsize=(10, 10), layout="constrained")
    loss_axis, norm_axis, heat_axis = figure.subplots(3, 1, height_ratios=(1, 1, 1.6))
    draw_loss(loss_axis, result, "C0", "training loss")
    loss_axis.set(ylabel="cross-entropy (nats/byte)", title=f"{result.folder.name}: {result.clipping}")
    draw_norms(norm_axis, result, "C0")
    norm_axis.set(ylabel="global grad L2 norm")
    norm_axis.legend(fontsize="small")
    image = draw_heatmap(heat_axis, result, _color_norm([result]))
    heat_axis.set(xlabel="optimizer step", title="per-parameter grad L2 norm (pre-clip)")
    figure.colorbar(image, ax=heat_axis)
    figure.savefig(path, dpi=100)


def plot_losses(results: Sequence[LanguageModelResult], path: Path, title: str) -> None:
    """The training loss of every run on one axis; triangles mark spike steps, circles evaluations."""
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    axis = figure.subplots()
    for index, result in enumerate(results):
        draw_loss(axis, result, f"C{index}", result.clipping)
    first = [r.records[0].loss for r in results if r.records and math.isfinite(r.records[0].loss)]
    finite = [r.loss for result in results for r in result.records if math.isfinite(r.loss)]
    if first and finite:
        axis.set_ylim(min(finite) * 0.95, max(first) * 1.05)
    axis.set(xlabel="optimizer step", ylabel="training cross-entropy (nats/byte)", title=title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small", ncols=2)
    figure.savefig(path, dpi=100)


def plot_norms(results: Sequence[LanguageModelResult], path: Path, title: str) -> None:
    """One panel per run: the global grad norm before and after clipping, its threshold, skipped steps."""
    columns = 2
    rows = math.ceil(len(results) / columns)
    figure = Figure(figsize=(11, 2.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).flatten()
    for index, (axis, result) in enumerate(zip(axes, results, strict=False)):
        draw_norms(axis, result, f"C{index}")
        axis.set_title(result.clipping, fontsize="medium")
        axis.legend(fontsize="x-small", loc="upper right")
    for axis in axes[len(results) :]:
        axis.set_visible(False)
    figure.supxlabel("optimizer step")
    figure.supylabel("global grad L2 norm")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)


def plot_layer_heatmaps(results: Sequence[LanguageModelResult], path: Path, title: str) -> None:
    """Side by side, on one colour scale: the per-parameter pre-clip grad norms of each run."""
    figure = Figure(figsize=(6 * len(results), 6), layout="constrained")
    axes = figure.subplots(1, len(results), squeeze=False).flatten()
    color_norm = _color_norm(results)
    image = None
    for axis, result in zip(axes, results, strict=True):
        image = draw_heatmap(axis, result, color_norm)
        axis.set(xlabel="optimizer step", title=result.clipping)
    if image is not None:
        figure.colorbar(image, ax=list(axes), label="grad L2 norm (before clipping)")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
