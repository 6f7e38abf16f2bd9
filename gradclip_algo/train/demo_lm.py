"""``make demo-lm``: loss spikes of a small transformer language model, with and without clipping.

``python -m gradclip_algo.train.demo_lm [--config demo_lm] [--seeds 0 1 2] [--jobs 2]
[--out runs] [--set key=value ...]``:

1. calibrates on the config (``gradclip-calibrate``'s measurement and recommendations: the first
   ``--calibration-steps`` unclipped steps of the first seed) and prints the recommendations;
2. trains, for every seed, the same config (same data, same initialisation) without clipping, with norm
   clipping at λ = 1.0 and at the calibrated mean norm, with ``quantile``, ``zscore`` and ``adagc`` (the
   papers' defaults, the calibrated ceiling), and with norm clipping at λ = 1.0 plus ``skip_spikes``;
3. prints a table of the first seed's runs and one over all seeds (mean and range), says which set-up beat
   no clipping on every seed, and writes ``loss.png``, ``grad_norms.png`` and ``layer_norms.png`` (the
   first seed's runs) into the demo folder ``<out>/demo_lm`` (``demo_lm-2``, ... when it exists).

Runs go to ``--jobs`` worker processes (default 2), each single-threaded (``cpu_threads``), so the figures
are the same whatever the number of jobs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from gradclip_algo.train.calibration import Recommendation, measure, plot_calibration, recommend
from gradclip_algo.train.interrupt import exit_status
from gradclip_algo.train.lm_results import LanguageModelResult
from gradclip_algo.train.pool import run_all
from gradclip_algo.train.run import build_parts, create_run_folder
from gradclip_algo.train.run_config import LanguageModelTaskConfig, RunConfig, RunConfigError, load_run_config
from gradclip_algo.train.shipped import resolve_config
from gradclip_algo.train.training import train

PROG = "gradclip_algo.train.demo_lm"
DEMO_CONFIG = "demo_lm"  # shipped in configs/
SEEDS = (0, 1, 2)
CALIBRATION_STEPS = 100
FIXED_THRESHOLD = 1.0
SKIP_SPIKES = 6.0  # OLMo-core's sigma factor
LAYER_NORMS_TOP_K = 5
COLUMNS = (
    "final eval loss",
    "best eval loss",
    "loss spikes",
    "spike score",
    "steps clipped",
    "steps skipped",
)


@dataclass(frozen=True)
class Variant:
    """One clipping set-up of the comparison: a folder-safe name and its ``algorithms:`` block."""

    name: str
    algorithms: dict[str, Any]


def _clipping(clipping_type: str, threshold: float, **options: Any) -> dict[str, Any]:
    settings = {"clipping_type": clipping_type, "clipping_threshold": threshold, **options}
    return {"gradclip_algo": {**settings, "log_interval": 1, "log_layer_norms": LAYER_NORMS_TOP_K}}


def variants(recommended: dict[str, Recommendation]) -> list[Variant]:
    """The compared set-ups; the calibrated ones take their thresholds from ``recommended``."""

    def calibrated(clipping_type: str) -> dict[str, Any]:
        rec = recommended[clipping_type]
        return _clipping(clipping_type, rec.clipping_threshold, **rec.options)

    return [
        Variant("none", {}),
        Variant("norm", _clipping("norm", FIXED_THRESHOLD)),
        Variant("norm_calibrated", calibrated("norm")),
        Variant("quantile", calibrated("quantile")),
        Variant("zscore", calibrated("zscore")),
        Variant("adagc", calibrated("adagc")),
        Variant("norm_skip_spikes", _clipping("norm", FIXED_THRESHOLD, skip_spikes=SKIP_SPIKES)),
    ]


def _row(result: LanguageModelResult) -> list[float]:
    s = result.summary
    return [
        s.final_eval_loss,
        s.best_eval_loss,
        s.loss_spikes,
        s.spike_score,
        s.clipped_steps,
        s.skipped_steps,
    ]


def _cell(value: float, column: str) -> str:
    if not math.isfinite(value):
        return str(value)
    if column in ("loss spikes", "steps clipped", "steps skipped"):
        return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    return f"{value:.2f}" if column == "spike score" else f"{value:.4f}"


def seed_table(results: Sequence[LanguageModelResult]) -> str:
    """A markdown table of one seed's runs."""
    lines = ["| run | clipping | " + " | ".join(COLUMNS) + " |", "| --- | --- |" + " ---: |" * len(COLUMNS)]
    for result in results:
        cells = [_cell(value, column) for value, column in zip(_row(result), COLUMNS, strict=True)]
        lines.append(f"| {result.folder.name} | {result.clipping} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(
    names: Sequence[str], clipping: Sequence[str], runs: Sequence[Sequence[LanguageModelResult]]
) -> str:
    """A markdown table over seeds: per set-up, each column's mean and [min, max]."""
    lines = ["| run | clipping | " + " | ".join(COLUMNS) + " |", "| --- | --- |" + " ---: |" * len(COLUMNS)]
    for name, words, results in zip(names, clipping, runs, strict=True):
        cells = []
        for index, column in enumerate(COLUMNS):
            values = [_row(result)[index] for result in results]
            finite = [v for v in values if math.isfinite(v)]
            if len(finite) < len(values):
                cells.append("nan in " + str(len(values) - len(finite)))
                continue
            mean = statistics.fmean(values)
            cells.append(
                f"{_cell(mean, column)} [{_cell(min(values), column)}, {_cell(max(values), column)}]"
            )
        lines.append(f"| {name} | {words} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def every_seed_verdicts(names: Sequence[str], runs: Sequence[Sequence[LanguageModelResult]]) -> list[str]:
    """Claims that hold on every seed: fewer loss spikes, a lower spike score, a lower best eval loss
    than no clipping (the first set-up)."""
    baseline = runs[0]
    checks = {
        "fewer loss spikes": lambda s: s.loss_spikes,
        "a lower spike score": lambda s: s.spike_score,
        "a lower best eval loss": lambda s: s.best_eval_loss,
        "a lower final eval loss": lambda s: s.final_eval_loss,
    }
    lines = []
    for what, value in checks.items():
        winners = [
            name
            for name, results in zip(names[1:], runs[1:], strict=True)
            if all(value(r.summary) < value(b.summary) for r, b in zip(results, baseline, strict=True))
        ]
        lines.append(f"{what} than {names[0]} on every seed: {', '.join(winners) or 'none'}")
    return lines


def best_index(runs: Sequence[Sequence[LanguageModelResult]]) -> int:
    """The clipped set-up with the lowest mean best eval loss over the seeds."""
    means = [statistics.fmean(r.summary.best_eval_loss for r in results) for results in runs[1:]]
    return 1 + min(range(len(means)), key=lambda i: means[i] if math.isfinite(means[i]) else math.inf)


def _train(config: RunConfig) -> LanguageModelResult:
    result = train(config, progress_bar=False)
    assert isinstance(result, LanguageModelResult)
    print(f"{result.folder}: {result.summary.describe()}", flush=True)
    return result


def calibrate(config: RunConfig, steps: int, folder: Path) -> dict[str, Recommendation]:
    """``gradclip-calibrate``'s measurement and recommendations, its files written into ``folder``."""
    measured = measure(config, steps)
    recommendations = recommend(measured)
    measured.write_csv(folder / "grad_norms.csv")
    for rec in recommendations:
        with (folder / f"algorithms_{rec.clipping_type}.yaml").open("w") as file:
            yaml.safe_dump(rec.algorithms_block(), file, sort_keys=False)
    plot_calibration(measured, recommendations, folder / "calibration.png")
    return {rec.clipping_type: rec for rec in recommendations}


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate, train every set-up for every seed, print the tables, write the plots."""
    from gradclip_algo.train.lm_plot import plot_layer_heatmaps, plot_losses, plot_norms

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=DEMO_CONFIG, help=f"language-model run config (default {DEMO_CONFIG})"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), metavar="SEED")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--calibration-steps", type=int, default=CALIBRATION_STEPS)
    parser.add_argument("--out", default="runs", help="parent of the demo folder (default: runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    args = parser.parse_args(argv)
    try:
        base = load_run_config(resolve_config(args.config), args.overrides)
        if not isinstance(base.task, LanguageModelTaskConfig):
            raise RunConfigError(f"{args.config}: expected task.name: language_model")
        build_parts(base)
    except RunConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    folder = create_run_folder(Path(args.out), "demo_lm")
    print(f"calibration: {args.calibration_steps} unclipped steps, seed {args.seeds[0]}", flush=True)
    recommended = calibrate(replace(base, seed=args.seeds[0], algorithms={}), args.calibration_steps, folder)
    for rec in recommended.values():
        print(f"  {rec.clipping_type:<9} {rec.clipping_threshold:<8g} {rec.reason}")
    chosen = variants(recommended)
    configs = [
        replace(
            base, run_name=f"{v.name}-seed{seed}", run_folder=str(folder), seed=seed, algorithms=v.algorithms
        )
        for v in chosen
        for seed in args.seeds
    ]
    for config in configs:
        build_parts(config)  # every set-up checked before the first run
    flat = run_all(_train, configs, args.jobs)
    count = len(args.seeds)
    runs = [flat[i * count : (i + 1) * count] for i in range(len(chosen))]
    names = [v.name for v in chosen]
    first = [results[0] for results in runs]
    print(f"\nseed {args.seeds[0]}:")
    print(seed_table(first))
    print(f"\nseeds {', '.join(map(str, args.seeds))}: mean [min, max]")
    print(seeds_table(names, [results[0].clipping for results in runs], runs))
    print()
    for line in every_seed_verdicts(names, runs):
        print(line)
    best = best_index(runs)
    title = f"seed {args.seeds[0]}"
    plot_losses(first, folder / "loss.png", f"Training loss, byte-level transformer, {title}")
    plot_norms(first, folder / "grad_norms.png", f"Global grad norm before and after clipping, {title}")
    plot_layer_heatmaps(
        [first[0], first[best]],
        folder / "layer_norms.png",
        f"Per-parameter grad norm (before clipping), {title}",
    )
    print(f"plots: {folder}/loss.png, grad_norms.png, layer_norms.png (heatmaps: none and {names[best]})")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(PROG, main))
