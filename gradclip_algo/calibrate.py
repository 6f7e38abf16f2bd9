"""``gradclip-calibrate CONFIG.yaml --steps N [key=value ...]``: measure gradient norms, recommend thresholds.

It trains ``N`` steps of a ``gradclip-train`` run config *without* clipping (its ``algorithms:`` block is
set aside), records per step the global L2 grad norm, the largest absolute grad element and AGC's per-unit
ratios ``‖G_u‖ / max(‖W_u‖, 1e-3)``, prints their statistics and a recommended setting for every clipping
type with its reasoning, and writes into a new folder ``<run_folder>/<run_name>-calibration``:

- ``algorithms_<type>.yaml``: a ready llm-foundry ``algorithms:`` block per clipping type,
- ``grad_norms.csv``: the per-step measurements,
- ``calibration.png``: the norm trajectory and its histogram with the recommended thresholds.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from composer.core import Callback, State
from composer.loggers import Logger
from matplotlib.figure import Figure
from torch import Tensor

from gradclip_algo.kernels import unit_norms
from gradclip_algo.norms import get_total_norm
from gradclip_algo.rules.adaptive import AGC_EPS
from gradclip_algo.train.run import build_parts, create_run_folder, make_trainer
from gradclip_algo.train.run_config import RunConfig, RunConfigError, load_run_config

PROG = "gradclip-calibrate"
MIN_STEPS = 2  # a standard deviation needs two norms
QUANTILE_LEVELS = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
AGC_PERCENTILE = 99.0
SUMMARY_PERCENTILES = (10.0, 50.0, 90.0, 99.0)


class CalibrationRecorder(Callback):
    """At ``Event.AFTER_TRAIN_BATCH`` (where clipping would run) keeps, per step, as device tensors:
    the global L2 grad norm, the largest ``|g|``, the global weight norm, and 101 quantiles (0 %, 1 %, …,
    100 %) of AGC's per-unit ratios; they are read from the device once, by :meth:`measurements`."""

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
                    get_total_norm(grads, 2.0, device),
                    get_total_norm(grads, math.inf, device),
                    get_total_norm(weights),
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
            unit_ratio_quantiles=torch.stack(self._ratio_quantiles).cpu(),
        )


@dataclass(frozen=True)
class Measurements:
    """Per-step values of an unclipped run (float64, one row per optimizer step)."""

    grad_norms: Tensor
    max_abs_grads: Tensor
    weight_norms: Tensor
    unit_ratio_quantiles: Tensor  # (steps, 101): each step's ratio distribution, by its quantiles

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["step", "grad_norm", "max_abs_grad", "weight_norm"])
            rows = torch.stack([self.grad_norms, self.max_abs_grads, self.weight_norms], dim=1).tolist()
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
        return {"algorithms": {"gradient_clipping": {**settings, **self.options}}}

    def overrides(self) -> str:
        """The same setting as ``gradclip-train`` overrides."""
        settings = {"clipping_type": self.clipping_type, "clipping_threshold": self.clipping_threshold}
        return " ".join(
            f"algorithms.gradient_clipping.{key}={value}"
            for key, value in {**settings, **self.options}.items()
        )


class CalibrationError(RuntimeError):
    """The calibration run cannot give recommendations (it diverged)."""


def _rounded(value: float) -> float:
    """Three significant digits: thresholds are not that precise, and a config should read well."""
    return float(f"{value:.3g}")


def recommend(measured: Measurements) -> list[Recommendation]:
    """A setting for every clipping type, from the measurements of an unclipped run.

    Raises:
        CalibrationError: the run diverged (a norm was inf or NaN): its numbers would recommend nothing.
    """
    nonfinite = (~torch.isfinite(measured.grad_norms)).nonzero()
    if nonfinite.numel():
        step = nonfinite[0].item() + 1
        raise CalibrationError(
            f"the unclipped run diverged: its gradient norm was inf or NaN from step {step} on (step 1: "
            f"{measured.grad_norms[0].item():.3g}, largest finite: "
            f"{measured.grad_norms[torch.isfinite(measured.grad_norms)].max().item():.3g}); thresholds measured "
            "on a diverging run mean nothing: calibrate where the run is stable, e.g. with a lower optimizer.lr"
        )
    norms = Statistics.of(measured.grad_norms)
    largest = Statistics.of(measured.max_abs_grads)
    agc = torch.quantile(measured.unit_ratio_quantiles.flatten(), AGC_PERCENTILE / 100).item()
    ceiling = _rounded(norms.max)
    ceiling_reason = (
        f"clipping_threshold {ceiling:g}, the largest norm of the unclipped run, is a ceiling that steps like "
        "those never reach; it bounds a spike before the statistics exist"
    )
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
            f"the p{AGC_PERCENTILE:g} of the per-unit ratios ||G_u|| / max(||W_u||, 1e-3) over all steps: about "
            f"{100 - AGC_PERCENTILE:g} % of unit updates of an unclipped run get clipped (Brock et al. 2021 "
            "used 0.01 at batch 1024-4096 and larger values for small batches)",
        ),
        Recommendation(
            "quantile",
            ceiling,
            {"percentile": 10.0, "window": 1000},
            f"AutoClip's p = 10 over the last 1000 norms (its paper's choice; over this run that is "
            f"{norms.percentiles[10.0]:.3g}); {ceiling_reason}",
        ),
        Recommendation(
            "zscore",
            ceiling,
            {"alpha": 0.97, "z_threshold": 2.5, "warmup_steps": 25},
            f"ZClip's defaults (alpha 0.97, z 2.5, 25 warm-up steps); {ceiling_reason} (the warm-up)",
        ),
        Recommendation(
            "adagc",
            ceiling,
            {"relative_threshold": 1.05, "beta": 0.98, "warmup_steps": 100},
            f"AdaGC's defaults (lambda_rel 1.05, beta 0.98) with 100 warm-up steps; {ceiling_reason} "
            "(lambda_abs of the warm-up)",
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
    """Train ``steps`` optimizer steps of ``config`` without clipping and return the measurements."""
    parts = build_parts(replace(config, algorithms={}))
    recorder = CalibrationRecorder()
    trainer = make_trainer(
        config, parts, [recorder], evaluate=False, max_duration=f"{steps}ba", progress_bar=False
    )
    trainer.fit()
    trainer.close()
    return recorder.measurements()


def _steps(value: str) -> int:
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < MIN_STEPS:
        raise argparse.ArgumentTypeError(f"expected an integer >= {MIN_STEPS}, got {value!r}")
    return steps


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog=PROG,
        description="Train N steps of a gradclip-train config without clipping, print gradient-norm "
        "statistics and a recommended threshold for every clipping type, and write ready algorithms "
        "blocks (YAML), the measurements (CSV) and a plot (PNG).",
    )
    parse.add_argument("config", help="run config YAML, e.g. configs/demo_unclipped.yaml")
    parse.add_argument(
        "--steps", type=_steps, required=True, help=f"optimizer steps to measure (>= {MIN_STEPS})"
    )
    parse.add_argument(
        "--out", type=Path, help="output folder (default: <run_folder>/<run_name>-calibration)"
    )
    parse.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optimizer.lr=0.1"
    )
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate; a bad config or argument exits with status 2 and one message, before any training."""
    args = parser().parse_intermixed_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        build_parts(replace(config, algorithms={}))  # the optimizer's options, checked before a folder exists
    except RunConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if config.algorithms:
        print(f"{PROG}: the config's algorithms block is set aside: calibration measures unclipped steps")
    measured = measure(config, args.steps)
    try:
        recommendations = recommend(measured)
    except CalibrationError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    if args.out is None:
        folder = create_run_folder(Path(config.run_folder), f"{config.run_name}-calibration")
    else:
        folder = args.out
        folder.mkdir(parents=True, exist_ok=True)
    measured.write_csv(folder / "grad_norms.csv")
    print(f"{args.steps} unclipped steps of {args.config}")
    print(f"  global grad L2 norm:  {Statistics.of(measured.grad_norms).describe()}")
    print(f"  largest |g| per step: {Statistics.of(measured.max_abs_grads).describe()}")
    ratio = measured.grad_norms / measured.weight_norms
    print(f"  ||G|| / ||W||:        {Statistics.of(ratio).describe()}")
    print("recommended settings:")
    for recommendation in recommendations:
        path = folder / f"algorithms_{recommendation.clipping_type}.yaml"
        with path.open("w") as file:
            yaml.safe_dump(recommendation.algorithms_block(), file, sort_keys=False)
        print(
            f"  {recommendation.clipping_type:<9} {recommendation.clipping_threshold:<8g} {recommendation.reason}"
        )
        print(f"            -> {path}")
    plot_calibration(measured, recommendations, folder / "calibration.png")
    print(f"plot: {folder / 'calibration.png'}")
    print(
        f"use one: gradclip-train {' '.join([args.config, *args.overrides, recommendations[0].overrides()])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
