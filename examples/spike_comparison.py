"""A gradient spike in the adding problem: no clipping, a fixed norm threshold, the statistics-driven types.

One bad batch (its targets multiplied by ``--factor``) arrives at step ``--spike-step`` of a run that
otherwise trains stably. The fixed threshold λ of ``'norm'`` comes from ``gradclip-calibrate``'s rule (the
mean norm of the same run's first ``--calibration-steps`` unclipped steps, Pascanu et al. 2013); the
statistics-driven types run with their papers' defaults and no ceiling (``clipping_threshold: .inf``),
so that what they do comes from their statistics alone. Prints a table and writes one PNG::

    python examples/spike_comparison.py            # or: make spikes
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from composer.core import Callback, Event, State
from composer.loggers import Logger
from matplotlib.figure import Figure

from gradclip_algo.train.adding_problem import MEAN_PREDICTOR_MSE
from gradclip_algo.train.calibration import measure, recommend
from gradclip_algo.train.metrics import StepMetricsRecorder, StepRecord
from gradclip_algo.train.run import build_parts, make_trainer
from gradclip_algo.train.run_config import RunConfig, load_run_config
from gradclip_algo.train.shipped import resolve_config

DEFAULT_OVERRIDES = ("optimizer.lr=0.05", "max_duration=1500ba")


class BadBatch(Callback):
    """Multiplies the targets of the batch of optimizer step ``step`` (counted from 1) by ``factor``."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_DATALOADER and state.timestamp.batch.value + 1 == self.step:
            inputs, targets = state.batch
            state.batch = (inputs, targets * self.factor)


@dataclass(frozen=True)
class Outcome:
    """One run: its per-step records and final evaluation MSE."""

    label: str
    records: list[StepRecord]
    eval_mse: float

    def loss_around(self, first: int, last: int) -> float:
        """Mean training loss over steps ``first..last`` (inf if any was not finite)."""
        losses = [r.loss for r in self.records if first <= r.step <= last]
        return sum(losses) / len(losses) if all(map(math.isfinite, losses)) else math.inf

    @property
    def clipped_steps(self) -> int:
        return sum(r.clipped for r in self.records)

    @property
    def skipped_steps(self) -> int:
        """Steps whose grads were all dropped: the optimizer got none (norm 0) though there were some."""
        return sum(r.grad_norm > 0 and r.clipped_grad_norm == 0 for r in self.records)

    def recovery_steps(self, spike_step: int, window: int = 10) -> int | None:
        """Steps after the spike until the mean loss of the last ``window`` steps (all after it) is back at
        the mean of the 100 steps before it; ``None``: never."""
        before = self.loss_around(spike_step - 100, spike_step - 1)
        for record in self.records:
            if (
                record.step >= spike_step + window
                and self.loss_around(record.step - window + 1, record.step) <= before
            ):
                return record.step - spike_step
        return None


def run(
    config: RunConfig, algorithms: dict[str, Any], label: str, bad_batch: BadBatch, folder: Path
) -> Outcome:
    # the run without clipping trains on after its loss overflows, so that every set-up runs every step
    config = replace(config, algorithms=algorithms, stop_on_nonfinite_loss=False)
    parts = build_parts(config)
    recorder = StepMetricsRecorder(folder / f"{label}.csv")
    trainer = make_trainer(config, parts, [recorder, bad_batch], progress_bar=False)
    trainer.fit()
    eval_mse = float(trainer.state.eval_metric_values["MeanSquaredError"])
    trainer.close()
    return Outcome(label, recorder.records, eval_mse)


def settings(config: RunConfig, calibration_steps: int) -> dict[str, dict[str, Any]]:
    """The compared ``algorithms:`` blocks, by label."""
    norm = next(r for r in recommend(measure(config, calibration_steps)) if r.clipping_type == "norm")
    fixed = {"clipping_type": "norm", "clipping_threshold": norm.clipping_threshold}
    unbounded = {"clipping_threshold": math.inf}
    return {
        "none": {},
        f"norm λ={norm.clipping_threshold:g}": {"gradclip_algo": fixed},
        f"norm λ={norm.clipping_threshold:g} + skip_spikes=6": {
            "gradclip_algo": {**fixed, "skip_spikes": 6.0}
        },
        "quantile p10": {"gradclip_algo": {"clipping_type": "quantile", **unbounded}},
        "zscore z2.5": {"gradclip_algo": {"clipping_type": "zscore", **unbounded}},
        "adagc": {"gradclip_algo": {"clipping_type": "adagc", **unbounded}},
    }


def _rolling_mean(values: list[float], width: int) -> list[float]:
    return [
        sum(values[max(0, i - width + 1) : i + 1]) / (i + 1 - max(0, i - width + 1))
        for i in range(len(values))
    ]


def plot(outcomes: Sequence[Outcome], spike_step: int, path: Path) -> None:
    """Training loss (20-step mean) and the grad norm SGD got, per step; y ranges cut to the useful part."""
    figure = Figure(figsize=(11, 7), layout="constrained")
    loss_axis, norm_axis = figure.subplots(2, 1, sharex=True)
    for index, outcome in enumerate(outcomes):
        steps = [r.step for r in outcome.records]
        losses = _rolling_mean([r.loss if math.isfinite(r.loss) else math.nan for r in outcome.records], 20)
        loss_axis.plot(steps, losses, lw=0.9, color=f"C{index}", label=outcome.label)
        norms = [r.clipped_grad_norm for r in outcome.records]
        norm_axis.plot(steps, norms, lw=0.6, color=f"C{index}", label=outcome.label)
    for axis in (loss_axis, norm_axis):
        axis.axvline(spike_step, color="grey", ls="--", lw=1)
        axis.grid(True, alpha=0.3)
    loss_axis.axhline(MEAN_PREDICTOR_MSE, color="grey", ls=":", lw=1.5, label="predicting the mean (1/6)")
    loss_axis.set(
        yscale="log",
        ylim=(1e-2, 1e2),
        ylabel="training loss (MSE, 20-step mean)",
        title=f"adding problem, bad batch at step {spike_step} (grey dashes)",
    )
    norm_axis.set(yscale="log", ylim=(1e-2, 1e4), ylabel="grad L2 norm given to SGD", xlabel="optimizer step")
    loss_axis.legend(fontsize="small", ncol=2, loc="upper left")
    figure.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parse = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parse.add_argument(
        "--config", default="demo_unclipped", help="a gradclip-train run config (path or shipped name)"
    )
    parse.add_argument("--spike-step", type=int, default=1000, help="optimizer step of the bad batch")
    parse.add_argument(
        "--factor", type=float, default=100.0, help="what the bad batch's targets are multiplied by"
    )
    parse.add_argument("--calibration-steps", type=int, default=200, help="unclipped steps that set norm's λ")
    parse.add_argument("--out", type=Path, default=Path("runs/spike_comparison.png"), help="the PNG to write")
    parse.add_argument(
        "overrides", nargs="*", help=f"config overrides, applied after {' '.join(DEFAULT_OVERRIDES)}"
    )
    args = parse.parse_intermixed_args(argv)
    config = load_run_config(resolve_config(args.config), [*DEFAULT_OVERRIDES, *args.overrides])
    bad_batch = BadBatch(args.spike_step, args.factor)
    outcomes = []
    with tempfile.TemporaryDirectory() as folder:
        for label, algorithms in settings(config, args.calibration_steps).items():
            outcomes.append(run(config, algorithms, label, bad_batch, Path(folder)))
    print(f"bad batch: targets x{args.factor:g} at step {args.spike_step}; {config.max_duration} of SGD")
    header = f"{'clipping':<34}{'norm at spike':>14}{'after clip':>11}{'loss +1..50':>12}{'recovered':>10}"
    print(header + f"{'final loss':>11}{'eval MSE':>10}{'clipped':>8}{'skipped':>8}")
    for outcome in outcomes:
        spike = next(r for r in outcome.records if r.step == args.spike_step)
        recovered = outcome.recovery_steps(args.spike_step)
        last = outcome.records[-1].step
        print(
            f"{outcome.label:<34}{spike.grad_norm:>14.4g}{spike.clipped_grad_norm:>11.4g}"
            f"{outcome.loss_around(args.spike_step + 1, args.spike_step + 50):>12.4g}"
            f"{'never' if recovered is None else f'{recovered} st':>10}"
            f"{outcome.loss_around(last - 49, last):>11.4g}{outcome.eval_mse:>10.4g}"
            f"{outcome.clipped_steps:>8}{outcome.skipped_steps:>8}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(outcomes, args.spike_step, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
