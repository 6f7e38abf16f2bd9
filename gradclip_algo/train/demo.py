"""``make demo``: runs that differ only in their clipping, side by side in one table and one plot.

``python -m gradclip_algo.train.demo [CONFIG ...] [--out runs] [--set key=value ...]`` trains each config
(a path or a shipped config's name; default: the shipped ``demo_unclipped`` and ``demo_clipped``, so it runs
from any directory) into a fresh folder ``runs/demo[-N]``, prints
final loss, best loss, evaluation MSE, the largest pre-clip gradient norm and the steps clipped per run, and
writes ``comparison.png`` (loss and gradient norm per step, thresholds drawn in) next to the run folders.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from gradclip_algo.train.interrupt import exit_status, stop_signals
from gradclip_algo.train.plot import PlotSeries, plot_runs
from gradclip_algo.train.run import RunResult, build_parts, create_run_folder
from gradclip_algo.train.run_config import RunConfigError, load_run_config
from gradclip_algo.train.shipped import resolve_config
from gradclip_algo.train.training import train

PROG = "gradclip_algo.train.demo"
DEMO_CONFIGS = ("demo_unclipped", "demo_clipped")  # shipped in configs/
COMPARISON_FILE = "comparison.png"


def _number(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def comparison_table(results: Sequence[RunResult]) -> str:
    """A markdown table, one row per run."""
    lines = [
        "| run | clipping | final loss | best loss | eval MSE | max pre-clip norm | steps clipped | first inf/NaN step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        summary = result.summary
        lines.append(
            f"| {result.folder.name} | {result.clipping} | {_number(summary.final_loss)} "
            f"| {_number(summary.best_loss)} | {_number(summary.eval_mse)} | {summary.max_grad_norm:.3g} "
            f"| {summary.clipped_steps} / {summary.steps} | {summary.first_nonfinite_step or '-'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Train every config into one fresh demo folder, print the table, write the comparison plot."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "configs",
        nargs="*",
        default=list(DEMO_CONFIGS),
        metavar="CONFIG",
        help="run config YAML or shipped config name (default: demo_unclipped demo_clipped)",
    )
    parser.add_argument("--out", default="runs", help="parent of the demo folder (default: runs)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="key=value",
        help="applied to every run",
    )
    args = parser.parse_args(argv)
    try:  # every config is checked, its algorithms and optimizer built, before the first run starts
        configs = [load_run_config(resolve_config(path), args.overrides) for path in args.configs]
        parts = [build_parts(config) for config in configs]
        folder = create_run_folder(Path(args.out), "demo")
    except RunConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    with stop_signals():  # a stop request during one run keeps the next from starting
        results = [
            train(replace(config, run_folder=str(folder)), run_parts)
            for config, run_parts in zip(configs, parts, strict=True)
        ]
    print(comparison_table(results))
    series = [PlotSeries(result.folder.name, result.records, result.threshold) for result in results]
    plot_runs(series, folder / COMPARISON_FILE, "The adding problem: the same run with and without clipping")
    print(f"plot: {folder / COMPARISON_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(PROG, main))
