"""Training one run of a config: the adding problem here, the language model in
:mod:`gradclip_algo.train.lm_run`; both fill a new run folder."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from omegaconf import OmegaConf

from gradclip_algo.train.interrupt import raise_if_requested, stop_signals
from gradclip_algo.train.lm_run import train_language_model
from gradclip_algo.train.metrics import StepMetricsRecorder, summarize
from gradclip_algo.train.plot import PlotSeries, plot_runs
from gradclip_algo.train.run import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    RunParts,
    RunResult,
    _json_number,
    build_parts,
    create_run_folder,
    describe_clipping,
    make_trainer,
)
from gradclip_algo.train.run_config import LanguageModelTaskConfig, RunConfig, to_dict
from gradclip_algo.train.run_end import COMPLETED, fit


class ProgressLines(Callback):
    """One line on stderr every ``every`` optimizer steps (and after the last one): step, duration, loss.

    Used instead of Composer's progress bar when stderr is not a terminal (a log file, a pipe), where the
    bar's redraws would become thousands of lines.
    """

    def __init__(self, every: int, name: str) -> None:
        self.every = every
        self.name = name

    def batch_end(self, state: State, logger: Logger) -> None:
        step = state.timestamp.batch.value
        last = state.max_duration is not None and state.timestamp >= state.max_duration  # type: ignore[operator]
        if step % self.every == 0 or last:
            loss = state.loss
            total = sum(loss.values()) if isinstance(loss, dict) else loss
            value = float(total) if isinstance(total, torch.Tensor) else float("nan")
            print(
                f"{self.name}: step {step} of {state.max_duration}, loss {value:.4g}",
                file=sys.stderr,
                flush=True,
            )


def train(
    config: RunConfig,
    parts: RunParts | None = None,
    *,
    progress_bar: bool | None = None,
    progress_every: int = 100,
) -> RunResult:
    """Train the run of ``config`` and fill a new run folder.

    The folder gets ``config.yaml`` (the config with every default filled in), ``metrics.csv`` (one row per
    optimizer step, written as training goes), ``summary.json`` and ``metrics.png``. A run ends early after
    a step whose loss is inf or NaN (unless ``config.stop_on_nonfinite_loss`` is false), or on SIGINT or
    SIGTERM: ``summary.json`` says so (``status``, ``interrupted``, ``last_step``; see
    :mod:`gradclip_algo.train.run_end`). An interrupted run draws no ``metrics.png`` and raises
    :class:`~gradclip_algo.train.interrupt.Interrupted` once its other files are written.

    Args:
        parts: what :func:`build_parts` made of ``config``, for a caller that checked several configs
            before training any; built here when not given.
        progress_bar: Composer's progress bar; by default on when stderr is a terminal. Without it, one
            line every ``progress_every`` steps goes to stderr.

    Raises:
        RunConfigError: before any folder is made, if ``parts`` is not given and the config is rejected.
    """
    if parts is None:
        parts = build_parts(config)
    with stop_signals():
        raise_if_requested()
        if isinstance(config.task, LanguageModelTaskConfig):
            return train_language_model(config, parts, progress_bar=progress_bar)
        return _train_adding_problem(config, parts, progress_bar, progress_every)


def _train_adding_problem(
    config: RunConfig, parts: RunParts, progress_bar: bool | None, progress_every: int
) -> RunResult:
    folder = create_run_folder(Path(config.run_folder), config.run_name)
    print(f"run folder: {folder}", flush=True)
    OmegaConf.save(OmegaConf.create(to_dict(config)), folder / CONFIG_FILE)
    recorder = StepMetricsRecorder(folder / METRICS_FILE)
    if progress_bar is None:
        progress_bar = sys.stderr.isatty()
    callbacks: list[Callback] = [recorder]
    if not progress_bar:
        callbacks.append(ProgressLines(progress_every, folder.name))
    trainer = make_trainer(config, parts, callbacks, run_name=folder.name, progress_bar=progress_bar)
    end = fit(trainer)
    evaluated = trainer.state.eval_metric_values.get("MeanSquaredError")
    eval_mse = float(evaluated) if end.status == COMPLETED and evaluated is not None else math.nan
    clipping, threshold = describe_clipping(parts.algorithms)
    summary = summarize(recorder.records, eval_mse)
    with (folder / SUMMARY_FILE).open("w") as file:
        values = {name: _json_number(value) for name, value in asdict(summary).items()}
        json.dump({"clipping": clipping, **values, **end.summary_fields()}, file, indent=2)
    end.report(folder)  # before the plot, which takes a second or more
    plot_runs([PlotSeries(folder.name, recorder.records, threshold)], folder / PLOT_FILE, f"{folder.name}")
    return RunResult(folder, recorder.records, summary, clipping, threshold, end)
