"""Plots of language-model runs and sweeps: training loss, grad norm before and after clipping with the
threshold, per-layer grad norms as a heatmap (layers by steps); final loss against learning rate, and the
instability signals (max attention logit, log Z). PNG files, no display needed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradclip_algo.train.lm_results import LanguageModelResult, LanguageModelSummary
from gradclip_algo.train.lm_sweep import Sweep, capped_loss
from gradclip_algo.train.loss_spikes import SPIKE_SIGMAS, SPIKE_WINDOW, spike_steps

MARKERS = "osD^v<>ph*"


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
        evals = [e for e in result.evals if e.step > 0]
        axis.plot(
            [e.step for e in evals], _finite([e.loss for e in evals]), "o", color=color, ms=3, mfc="white"
        )


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
    """One run: loss, global norms with the threshold, max attention logit, and the per-layer heatmap where
    the run recorded per-parameter norms."""
    heights = (1, 1, 0.8, 1.6) if result.layer_rows else (1, 1, 0.8)
    figure = Figure(figsize=(10, 3 * sum(heights)), layout="constrained")
    axes = figure.subplots(len(heights), 1, height_ratios=heights, sharex=True)
    loss_axis, norm_axis, attention_axis = axes[:3]
    draw_loss(loss_axis, result, "C0", "training loss")
    loss_axis.set(ylabel="cross-entropy (nats/byte)", title=f"{result.folder.name}: {result.clipping}")
    draw_norms(norm_axis, result, "C0")
    norm_axis.set(ylabel="global grad L2 norm")
    norm_axis.legend(fontsize="small")
    steps = [r.step for r in result.records]
    attention_axis.plot(steps, _finite([r.max_attention_logit for r in result.records]), color="C0", lw=0.8)
    attention_axis.set(yscale="log", ylabel="max attention logit")
    attention_axis.grid(True, alpha=0.3)
    if result.layer_rows:
        image = draw_heatmap(axes[3], result, _color_norm([result]))
        axes[3].set(title="per-parameter grad L2 norm (pre-clip)")
        figure.colorbar(image, ax=axes[3])
    axes[-1].set(xlabel="optimizer step")
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
    handles, _ = axis.get_legend_handles_labels()
    handles += [
        Line2D(
            [],
            [],
            color="0.3",
            marker="v",
            ls="none",
            ms=4,
            label=f"spike step (> {SPIKE_SIGMAS:g} sd over {SPIKE_WINDOW} steps)",
        ),
        Line2D([], [], color="0.3", marker="o", mfc="white", ls="none", ms=3, label="evaluation loss"),
    ]
    axis.legend(handles=handles, fontsize="small", ncols=2)
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


def _lr_offsets(count: int) -> list[float]:
    """Multiplicative x offsets that keep the error bars of ``count`` curves on a log axis apart."""
    return [10 ** (0.025 * (index - (count - 1) / 2)) for index in range(count)]


def plot_lr_sensitivity(sweep: Sweep, margin: float, path: Path) -> None:
    """Final evaluation loss against learning rate (log x), one curve per set-up: the seed mean of the loss
    capped at L0, bars from the lowest to the highest seed; L0 dashed; LR sensitivity in the legend."""
    figure = Figure(figsize=(10, 5.5), layout="constrained")
    axis = figure.subplots()
    for index, (setup, offset) in enumerate(zip(sweep.setups, _lr_offsets(len(sweep.setups)), strict=True)):
        per_seed = [
            [
                capped_loss(sweep.runs[setup, lr, seed].final_eval_loss, sweep.initial_loss(seed))
                for seed in sweep.seeds
            ]
            for lr in sweep.lrs
        ]
        means = [statistics.fmean(values) for values in per_seed]
        below = [mean - min(values) for mean, values in zip(means, per_seed, strict=True)]
        above = [max(values) - mean for mean, values in zip(means, per_seed, strict=True)]
        sensitivity = statistics.fmean(sweep.sensitivities(setup))
        axis.errorbar(
            [lr * offset for lr in sweep.lrs],
            means,
            yerr=[below, above],
            color=f"C{index}",
            marker=MARKERS[index % len(MARKERS)],
            ms=5,
            lw=1.2,
            capsize=2,
            label=f"{setup} ({sweep.clipping[setup]}): LR sensitivity {sensitivity:.3f}",
        )
    initial = statistics.fmean(sweep.initial_loss(seed) for seed in sweep.seeds)
    axis.axhline(initial, color="0.4", ls="--", lw=1, label=f"loss at initialisation L0 = {initial:.2f}")
    axis.set(
        xscale="log",
        xlabel="peak learning rate",
        ylabel="final eval cross-entropy (nats/byte), capped at L0",
        title=(
            f"Final loss against learning rate: mean and range over seeds {', '.join(map(str, sweep.seeds))} "
            f"(trainable: within {margin:g} of a curve's best)"
        ),
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)


LINE_STYLES = ("-", "--", ":", "-.")


def _per_step(axis: Axes, focus: Sequence[LanguageModelResult], value: str, label: str, at: str) -> None:
    """One line per run of ``value`` (a field of the step records) against the step, log y; line styles
    cycle so that runs that coincide (a rule that never clipped) stay visible."""
    for index, result in enumerate(focus):
        axis.plot(
            [r.step for r in result.records],
            _finite([getattr(r, value) for r in result.records]),
            color=f"C{index}",
            ls=LINE_STYLES[index % len(LINE_STYLES)],
            lw=1.0,
            label=result.clipping,
        )
    axis.set(yscale="log", xlabel="optimizer step", ylabel=label, title=at)
    axis.legend(fontsize="x-small")


def _per_lr(axis: Axes, sweep: Sweep, value: Callable[[LanguageModelSummary], float]) -> None:
    """One curve per set-up of the seed mean of ``value`` against the learning rate, log x."""
    offsets = _lr_offsets(len(sweep.setups))
    for index, setup in enumerate(sweep.setups):
        axis.plot(
            [lr * offsets[index] for lr in sweep.lrs],
            [statistics.fmean(sweep.values(setup, lr, value)) for lr in sweep.lrs],
            color=f"C{index}",
            marker=MARKERS[index % len(MARKERS)],
            ms=4,
            lw=1.0,
            label=setup,
        )
    axis.set(xscale="log", xlabel="peak learning rate")


def plot_instability(focus: Sequence[LanguageModelResult], sweep: Sweep, path: Path, at: str) -> None:
    """Top: per step of the ``focus`` runs, the max attention logit and the update norm; bottom: per learning
    rate, the seed means of the max attention logit and of the final log Z, one curve per set-up."""
    figure = Figure(figsize=(13, 9), layout="constrained")
    (logit_steps, update_steps), (logit_lrs, partition_lrs) = figure.subplots(2, 2)
    _per_step(logit_steps, focus, "max_attention_logit", "max attention logit", f"attention logits, {at}")
    _per_step(update_steps, focus, "update_norm", "update norm ‖θ_t - θ_(t-1)‖", f"optimizer steps, {at}")
    _per_lr(logit_lrs, sweep, lambda s: s.max_attention_logit)
    logit_lrs.set(
        yscale="log",
        ylabel="max attention logit (largest of any step)",
        title="attention-logit growth, seed mean",
    )
    logit_lrs.legend(fontsize="x-small")
    _per_lr(partition_lrs, sweep, lambda s: s.log_partition)
    partition_lrs.axhline(0.0, color="0.4", ls=":", lw=1)
    partition_lrs.set(ylabel="final mean log Z of the output logits", title="output-logit drift, seed mean")
    for axis in (logit_steps, update_steps, logit_lrs, partition_lrs):
        axis.grid(True, which="both", alpha=0.3)
    figure.savefig(path, dpi=100)
