"""``make demo-lm``: at which learning rates does each clipping type keep a small transformer trainable?

``python -m gradclip_algo.train.demo_lm [--config demo_lm] [--lrs LR ...] [--seeds 0 1 2]
[--setups NAME ...] [--focus-lr LR] [--jobs 2] [--calibration-steps 100] [--out runs]
[--set key=value ...]``

An lr sweep after Wortsman et al. (2023, arXiv 2309.14322), scaled to a CPU:

1. calibrates on the config at its own learning rate (``gradclip-calibrate``'s measurement and
   recommendations: the first ``--calibration-steps`` unclipped steps of the first seed);
2. trains every set-up at every learning rate of ``--lrs`` and every seed, each seed with its own data
   order and initialisation, the same for every set-up and learning rate: no clipping; norm clipping at
   λ = 1.0 (the paper's recipe) and at the calibrated λ; ``quantile``, ``zscore`` and ``adagc`` with their
   papers' defaults and the calibrated ceiling; norm at λ = 1.0 with ``skip_spikes``. The weight decay is
   independent of the learning rate: the config's ``lr * weight_decay`` (with AdamW's coupled decay, the
   decay per step at the peak of the schedule) is kept for every learning rate;
3. prints the final evaluation loss per set-up and learning rate, the max attention logit and the
   output log-partition ``log Z`` per learning rate, each set-up's LR sensitivity and largest trainable
   learning rate (:mod:`gradclip_algo.train.lm_sweep`), a table at ``--focus-lr`` (default: the largest)
   and verdict lines computed from these numbers;
4. writes ``lr_sensitivity.png``, ``instability.png`` (max attention logit and update norm per step at
   the focus learning rate and first seed; max attention logit and log Z per learning rate), and, at the
   focus learning rate and the first seed, ``loss.png``, ``grad_norms.png`` and ``layer_norms.png`` (no
   clipping and norm clipping at λ = 1.0), with the calibration's files, into the demo folder
   ``<out>/demo_lm`` (``demo_lm-2``, ... when it exists).

Runs go to ``--jobs`` worker processes (default 2; :func:`gradclip_algo.train.pool.run_all`), each
single-threaded (``cpu_threads``), so the numbers are the same whatever the number of jobs. Ctrl-C or
SIGTERM starts no further run and stops the running ones after their current step, marked as interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from gradclip_algo.train.calibration import Recommendation, measure, plot_calibration, recommend
from gradclip_algo.train.interrupt import exit_status
from gradclip_algo.train.lm_plot import (
    plot_instability,
    plot_layer_heatmaps,
    plot_losses,
    plot_lr_sensitivity,
    plot_norms,
)
from gradclip_algo.train.lm_results import LanguageModelResult
from gradclip_algo.train.lm_run import train_language_model
from gradclip_algo.train.lm_sweep import (
    MARGIN,
    Sweep,
    focus_table,
    instability_verdicts,
    loss_table,
    loss_verdicts,
    range_verdicts,
    seed_mean_table,
    sensitivity_table,
)
from gradclip_algo.train.pool import run_all
from gradclip_algo.train.run import build_parts, create_run_folder
from gradclip_algo.train.run_config import LanguageModelTaskConfig, RunConfig, RunConfigError, load_run_config
from gradclip_algo.train.shipped import resolve_config

PROG = "gradclip_algo.train.demo_lm"
DEMO_CONFIG = "demo_lm"  # shipped in configs/
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SEEDS = (0, 1, 2)
CALIBRATION_STEPS = 100
FIXED_THRESHOLD = 1.0
SKIP_SPIKES = 6.0  # OLMo-core's sigma factor
LAYER_NORMS_TOP_K = 5
SETUPS = ("none", "norm", "norm_calibrated", "quantile", "zscore", "adagc", "norm_skip_spikes")
HEATMAP_SETUPS = ("none", "norm")
"""The runs whose per-parameter grad norms are recorded (focus learning rate, first seed)."""


def _clipping(clipping_type: str, threshold: float, **options: Any) -> dict[str, Any]:
    return {"clipping_type": clipping_type, "clipping_threshold": threshold, **options}


def setups(recommended: dict[str, Recommendation]) -> dict[str, dict[str, Any]]:
    """Every set-up's clipping settings (``{}``: none); the calibrated ones take ``recommended``'s."""

    def calibrated(clipping_type: str) -> dict[str, Any]:
        rec = recommended[clipping_type]
        return _clipping(clipping_type, rec.clipping_threshold, **rec.options)

    return {
        "none": {},
        "norm": _clipping("norm", FIXED_THRESHOLD),
        "norm_calibrated": calibrated("norm"),
        "quantile": calibrated("quantile"),
        "zscore": calibrated("zscore"),
        "adagc": calibrated("adagc"),
        "norm_skip_spikes": _clipping("norm", FIXED_THRESHOLD, skip_spikes=SKIP_SPIKES),
    }


@dataclass(frozen=True)
class Job:
    """One run of the sweep: its set-up, learning rate and seed, its config, and whether it records the
    per-parameter grad norms."""

    setup: str
    lr: float
    seed: int
    config: RunConfig
    layer_norms: bool


def sweep_jobs(
    base: RunConfig,
    settings: dict[str, dict[str, Any]],
    lrs: Sequence[float],
    seeds: Sequence[int],
    focus_lr: float,
    folder: Path,
) -> list[Job]:
    """The runs of the sweep, set-up by set-up, learning rate by learning rate, seed by seed."""
    decay = base.optimizer.lr * float(base.optimizer.options.get("weight_decay", 0.0))
    jobs = []
    for setup, clipping in settings.items():
        for lr in lrs:
            for seed in seeds:
                layer_norms = setup in HEATMAP_SETUPS and lr == focus_lr and seed == seeds[0]
                logging = {"log_interval": 1, "log_layer_norms": LAYER_NORMS_TOP_K} if layer_norms else {}
                optimizer = replace(
                    base.optimizer, lr=lr, options={**base.optimizer.options, "weight_decay": decay / lr}
                )
                config = replace(
                    base,
                    run_name=f"{setup}-lr{lr:g}-seed{seed}",
                    run_folder=str(folder),
                    seed=seed,
                    optimizer=optimizer,
                    algorithms={"gradclip_algo": {**clipping, **logging}} if clipping else {},
                )
                jobs.append(Job(setup, lr, seed, config, layer_norms))
    return jobs


def train_job(job: Job) -> LanguageModelResult:
    """Train one run of the sweep (no per-run figure) and print its summary line."""
    result = train_language_model(
        job.config, build_parts(job.config), progress_bar=False, layer_norms=job.layer_norms, plot=False
    )
    print(f"{result.folder.name}: {result.summary.describe()}", flush=True)
    return result


def collect(jobs: Sequence[Job], results: Sequence[LanguageModelResult]) -> Sweep:
    """The sweep of ``jobs``' results: set-ups, learning rates and seeds in the order the jobs first name
    them (learning rates ascending)."""
    pairs = list(zip(jobs, results, strict=True))
    return Sweep(
        setups=tuple(dict.fromkeys(job.setup for job in jobs)),
        clipping={job.setup: result.clipping for job, result in pairs},
        lrs=tuple(sorted({job.lr for job in jobs})),
        seeds=tuple(dict.fromkeys(job.seed for job in jobs)),
        runs={(job.setup, job.lr, job.seed): result.summary for job, result in pairs},
    )


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=DEMO_CONFIG, help=f"language-model run config (default {DEMO_CONFIG})"
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS), metavar="LR")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), metavar="SEED")
    parser.add_argument(
        "--setups",
        nargs="+",
        choices=SETUPS,
        default=list(SETUPS),
        metavar="NAME",
        help=f"the set-ups to train, of {', '.join(SETUPS)} (none, the baseline, always)",
    )
    parser.add_argument(
        "--focus-lr", type=float, help="the learning rate of the per-step figures (default: the largest)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--calibration-steps", type=int, default=CALIBRATION_STEPS)
    parser.add_argument("--out", default="runs", help="parent of the demo folder (default: runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    return parser


@dataclass(frozen=True)
class Plan:
    """The checked arguments of a sweep."""

    base: RunConfig
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    setups: tuple[str, ...]
    focus_lr: float


def plan(args: argparse.Namespace) -> Plan:
    """The sweep the arguments ask for.

    Raises:
        RunConfigError: a bad config, override, learning rate or seed list (one line).
    """
    base = load_run_config(resolve_config(args.config), args.overrides)
    if not isinstance(base.task, LanguageModelTaskConfig):
        raise RunConfigError(f"{args.config}: expected task.name: language_model")
    build_parts(base)
    lrs = tuple(sorted(set(args.lrs)))
    if lrs[0] <= 0:
        raise RunConfigError(f"--lrs: expected learning rates > 0, got {lrs[0]:g}")
    focus = lrs[-1] if args.focus_lr is None else args.focus_lr
    if focus not in lrs:
        raise RunConfigError(
            f"--focus-lr: expected one of --lrs ({', '.join(f'{lr:g}' for lr in lrs)}), got {focus:g}"
        )
    if len(set(args.seeds)) < len(args.seeds) or min(args.seeds) < 0:
        raise RunConfigError(f"--seeds: expected distinct seeds >= 0, got {' '.join(map(str, args.seeds))}")
    chosen = tuple(name for name in SETUPS if name == "none" or name in args.setups)
    return Plan(base, lrs, tuple(args.seeds), chosen, focus)


def report(sweep: Sweep, focus_lr: float) -> None:
    """The tables and verdict lines of a sweep."""
    seeds = ", ".join(map(str, sweep.seeds))
    print(f"\nfinal eval loss (nats/byte), seeds {seeds}: mean [min, max]")
    print(loss_table(sweep))
    print(f"\nmax attention logit (largest of any training step), mean over seeds {seeds}")
    print(seed_mean_table(sweep, lambda s: s.max_attention_logit))
    print(f"\noutput log-partition log Z at the end, mean over seeds {seeds}")
    print(seed_mean_table(sweep, lambda s: s.log_partition))
    print(f"\nLR sensitivity (Wortsman et al. 2023), seeds {seeds}")
    print(sensitivity_table(sweep, MARGIN))
    print(f"\nat lr {focus_lr:g}, mean over seeds {seeds}")
    print(focus_table(sweep, focus_lr))
    print()
    for line in range_verdicts(sweep, MARGIN) + loss_verdicts(sweep) + instability_verdicts(sweep, focus_lr):
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate, train the sweep, print the tables and verdicts, write the figures."""
    args = _parser().parse_args(argv)
    try:
        chosen = plan(args)
    except RunConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    folder = create_run_folder(Path(args.out), "demo_lm")
    base, seed = chosen.base, chosen.seeds[0]
    print(
        f"calibration: {args.calibration_steps} unclipped steps at lr {base.optimizer.lr:g}, seed {seed}",
        flush=True,
    )
    recommended = calibrate(replace(base, seed=seed, algorithms={}), args.calibration_steps, folder)
    for rec in recommended.values():
        print(f"  {rec.clipping_type:<9} {rec.clipping_threshold:<8g} {rec.reason}")
    settings = {name: value for name, value in setups(recommended).items() if name in chosen.setups}
    jobs = sweep_jobs(base, settings, chosen.lrs, chosen.seeds, chosen.focus_lr, folder)
    for job in jobs:
        build_parts(job.config)  # every run checked before the first one trains
    results = run_all(train_job, jobs, args.jobs)
    sweep = collect(jobs, results)
    report(sweep, chosen.focus_lr)
    focus = [
        r for job, r in zip(jobs, results, strict=True) if job.lr == chosen.focus_lr and job.seed == seed
    ]
    at = f"lr {chosen.focus_lr:g}, seed {seed}"
    plot_lr_sensitivity(sweep, MARGIN, folder / "lr_sensitivity.png")
    plot_instability(focus, sweep, folder / "instability.png", at)
    plot_losses(focus, folder / "loss.png", f"Training loss, byte-level transformer, {at}")
    plot_norms(focus, folder / "grad_norms.png", f"Global grad norm before and after clipping, {at}")
    heatmaps = [r for job, r in zip(jobs, results, strict=True) if job.layer_norms]
    plot_layer_heatmaps(
        heatmaps, folder / "layer_norms.png", f"Per-parameter grad norm (before clipping), {at}"
    )
    names = ("lr_sensitivity", "instability", "loss", "grad_norms", "layer_norms", "calibration")
    print(f"\nfigures in {folder}: " + ", ".join(f"{name}.png" for name in names))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(PROG, main))
