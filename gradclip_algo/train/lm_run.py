"""A language-model run of ``gradclip-train``: per-step records with per-layer grad norms, evaluation
losses, loss spikes, and the run folder's files.

Per optimizer step the recorder keeps the training loss, the global grad norm before and after clipping,
whether the step was clipped or skipped, the threshold the norm was held against, and the L2 grad norm of
every parameter. Pre-clip values come from the clipping algorithm (its ``last_stats`` and, with
``log_layer_norms``, its ``last_layer_norms``); without clipping pre and post are the same grads. The
recorder reads the device once per step, at ``Event.BATCH_END``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import IO, Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from omegaconf import OmegaConf
from torch import Tensor

from gradclip_algo.algorithm import GradClipAlgo
from gradclip_algo.layer_norms import LayerGradNorms, grad_norms_by_name
from gradclip_algo.norm_history import recorded
from gradclip_algo.norms import get_total_norm
from gradclip_algo.train.lm_model import EVAL_METRIC
from gradclip_algo.train.lm_results import LanguageModelResult, LMStepRecord, summarize_lm
from gradclip_algo.train.run import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    RunParts,
    _json_number,
    create_run_folder,
    describe_clipping,
    make_trainer,
)
from gradclip_algo.train.run_config import RunConfig, to_dict
from gradclip_algo.train.run_end import fit

LAYER_NORMS_FILE = "layer_norms.csv"
EVAL_FILE = "eval.csv"


def skip_limit(algorithm: GradClipAlgo, before: dict[str, Tensor] | None) -> Tensor:
    """``mean + k·std`` of the spike window before the call, NaN while fewer than half of it is filled."""
    clipper = algorithm.clipper
    if clipper.skip_spikes is None or before is None:
        return torch.tensor(math.nan)
    norms = before["norms"].cpu()
    window = norms[recorded(before).cpu()]
    if window.numel() < max(2, norms.numel() // 2):
        return torch.tensor(math.nan)
    return window.mean() + clipper.skip_spikes * window.std()


class LanguageModelRecorder(Callback):
    """Writes ``metrics.csv`` (one :class:`LMStepRecord` per step), ``layer_norms.csv`` (one row of
    per-parameter grad norms per step) and ``eval.csv`` (evaluation loss per evaluation) into ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.records: list[LMStepRecord] = []
        self.layer_names: list[str] = []
        self.layer_rows: list[list[float]] = []
        self.evals: list[tuple[int, float]] = []
        self._clipping: GradClipAlgo | None = None
        self._files: list[IO[str]] = []
        self._before: dict[str, Tensor] | None = None
        self._values: Tensor | None = None
        self._flags: tuple[bool, bool] = (False, False)
        self._used: LayerGradNorms | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        clippers = [algo for algo in state.algorithms if isinstance(algo, GradClipAlgo)]
        self._clipping = clippers[0] if clippers else None
        if self._clipping is not None:  # the pre-clip norm of every step, not only of the logged ones
            self._clipping.stats_every_step = True
        self.layer_names = [name for name, param in state.model.named_parameters() if param.requires_grad]
        self._files = [
            (self.folder / name).open("w", newline="") for name in (METRICS_FILE, LAYER_NORMS_FILE)
        ]
        csv.writer(self._files[0]).writerow(f.name for f in fields(LMStepRecord))
        csv.writer(self._files[1]).writerow(["step", *self.layer_names])

    def after_backward(self, state: State, logger: Logger) -> None:
        """The spike window before this step's clipping (the last microbatch's call wins)."""
        if self._clipping is not None:
            window = self._clipping.clipper.spike_state
            self._before = None if window is None else {key: value.clone() for key, value in window.items()}

    def after_train_batch(self, state: State, logger: Logger) -> None:
        params = [p for p in state.model.parameters() if p.grad is not None]
        after = get_total_norm([p.grad for p in params], 2.0) if params else torch.zeros(())
        nan = torch.tensor(math.nan)
        algorithm = self._clipping
        if algorithm is None or algorithm.last_stats is None:
            before, threshold, limit, clipped, skipped = after, nan, nan, torch.tensor(False), False
            layer = grad_norms_by_name(state.model)  # no clipping: these are also the pre-clip norms
        else:
            stats = algorithm.last_stats
            before, clipped, skipped = stats.grad_norm, stats.clipped_fraction > 0, stats.skipped
            threshold = nan if stats.threshold is None else stats.threshold
            limit = skip_limit(algorithm, self._before)
            fresh = algorithm.last_layer_norms is not None and algorithm.last_layer_norms is not self._used
            layer = algorithm.last_layer_norms if fresh else grad_norms_by_name(state.model)
            self._used = algorithm.last_layer_norms  # steps that log none measure here (after clipping)
        by_name = dict(zip(layer.names, layer.norms.cpu().unbind(), strict=True)) if layer.names else {}
        row = [by_name.get(name, nan) for name in self.layer_names]
        scalars = [before, after, threshold, limit, clipped.to(torch.float32)]
        self._values = torch.stack([value.detach().cpu().to(torch.float32) for value in scalars + row])
        self._flags = (False, skipped)

    def batch_end(self, state: State, logger: Logger) -> None:
        assert self._values is not None
        values = self._values.tolist()
        step = int(state.timestamp.batch.value)
        record = LMStepRecord(
            step=step,
            loss=float(state.total_loss_dict.get("loss/train/total", math.nan)),
            grad_norm=values[0],
            clipped_grad_norm=values[1],
            threshold=values[2],
            skip_limit=values[3],
            clipped=bool(values[4]),
            skipped=self._flags[1],
        )
        self.records.append(record)
        self.layer_rows.append(values[5:])
        csv.writer(self._files[0]).writerow(asdict(record).values())
        csv.writer(self._files[1]).writerow([step, *values[5:]])

    def eval_end(self, state: State, logger: Logger) -> None:
        value = state.eval_metric_values.get(EVAL_METRIC)
        if value is not None:
            step = int(state.timestamp.batch.value)
            if not self.evals or self.evals[-1][0] != step:
                self.evals.append((step, float(value)))

    def close(self, state: State, logger: Logger) -> None:
        for file in self._files:
            file.close()
        self._files = []
        with (self.folder / EVAL_FILE).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["step", "eval_loss"])
            writer.writerows(self.evals)


def describe_lm_clipping(config: RunConfig) -> str:
    """The clipping of a config in a few words: ``none``, ``norm λ=1``, ``zscore λ=4.2 + skip_spikes=6``."""
    settings: dict[str, Any] = next(iter(config.algorithms.values()), None) or {}
    if not settings:
        return "none"
    words = f"{settings['clipping_type']} λ={float(settings['clipping_threshold']):g}"
    if settings.get("skip_spikes") is not None:
        words += f" + skip_spikes={settings['skip_spikes']:g}"
    return words


def train_language_model(
    config: RunConfig, parts: RunParts, *, progress_bar: bool = True
) -> LanguageModelResult:
    """Train a language-model run into a new run folder: ``config.yaml``, ``metrics.csv``,
    ``layer_norms.csv``, ``eval.csv``, ``summary.json`` and ``metrics.png``."""
    from gradclip_algo.train.lm_plot import plot_lm_run  # matplotlib only when a run ends

    folder = create_run_folder(Path(config.run_folder), config.run_name)
    print(f"run folder: {folder}", flush=True)
    OmegaConf.save(OmegaConf.create(to_dict(config)), folder / CONFIG_FILE)
    recorder = LanguageModelRecorder(folder)
    trainer = make_trainer(config, parts, [recorder], run_name=folder.name, progress_bar=progress_bar)
    end = fit(trainer)
    summary = summarize_lm(recorder.records, recorder.evals)
    clipping = describe_lm_clipping(config) if config.algorithms else describe_clipping(parts.algorithms)[0]
    with (folder / SUMMARY_FILE).open("w") as file:
        values = {name: _json_number(value) for name, value in asdict(summary).items()}
        json.dump({"clipping": clipping, **values, **end.summary_fields()}, file, indent=2)
    result = LanguageModelResult(
        folder, recorder.records, recorder.layer_names, recorder.layer_rows, recorder.evals, summary, clipping
    )
    end.report(folder)
    plot_lm_run(result, folder / PLOT_FILE)
    return result
