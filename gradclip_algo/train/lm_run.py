"""A language-model run of ``gradclip-train``: per-step records with per-layer grad norms, evaluation
losses and log-partitions, loss spikes, and the run folder's files.

Per optimizer step the recorder keeps the training loss, the global grad norm before and after clipping,
whether the step was clipped or skipped, the threshold the norm was held against, the largest attention
logit of the step's forward pass and (unless told not to) the L2 grad norm of every parameter. Pre-clip
values come from the clipping algorithm (its ``last_stats`` and, with ``log_layer_norms``, its
``last_layer_norms``); without clipping pre and post are the same grads. The recorder reads the device once
per step, at ``Event.BATCH_END``. The model is evaluated once before the first step (the loss at
initialisation) and then every ``task.eval_interval`` steps and at the end.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, astuple, fields
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
from gradclip_algo.train.language_model import ByteTransformer
from gradclip_algo.train.lm_model import EVAL_METRIC, LOG_PARTITION_METRIC, LanguageModel
from gradclip_algo.train.lm_results import EvalRecord, LanguageModelResult, LMStepRecord, summarize_lm
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
    per-parameter grad norms per step; only with ``layer_norms``) and ``eval.csv`` (one
    :class:`EvalRecord` per evaluation) into ``folder``."""

    def __init__(self, folder: Path, *, layer_norms: bool = True) -> None:
        self.folder = folder
        self.layer_norms = layer_norms
        self.records: list[LMStepRecord] = []
        self.layer_names: list[str] = []
        self.layer_rows: list[list[float]] = []
        self.evals: list[EvalRecord] = []
        self._clipping: GradClipAlgo | None = None
        self._files: list[IO[str]] = []
        self._before: dict[str, Tensor] | None = None
        self._values: Tensor | None = None
        self._skipped: bool | Tensor = False
        self._weights: list[Tensor] = []
        self._used: LayerGradNorms | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        clippers = [algo for algo in state.algorithms if isinstance(algo, GradClipAlgo)]
        self._clipping = clippers[0] if clippers else None
        if self._clipping is not None:  # the pre-clip norm of every step, not only of the logged ones
            self._clipping.stats_every_step = True
        if self.layer_norms:
            self.layer_names = [name for name, param in state.model.named_parameters() if param.requires_grad]
        names = (METRICS_FILE, LAYER_NORMS_FILE) if self.layer_norms else (METRICS_FILE,)
        self._files = [(self.folder / name).open("w", newline="") for name in names]
        csv.writer(self._files[0]).writerow(f.name for f in fields(LMStepRecord))
        if self.layer_norms:
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
        else:
            stats = algorithm.last_stats
            before, clipped, skipped = stats.grad_norm, stats.clipped_fraction > 0, stats.skipped
            threshold = nan if stats.threshold is None else stats.threshold
            limit = skip_limit(algorithm, self._before)
        attention = _network(state).max_attention_logit()
        scalars = [before, after, threshold, limit, clipped.to(torch.float32), attention]
        row = self._layer_row(state, algorithm) if self.layer_norms else []
        self._values = torch.stack([value.detach().cpu().to(torch.float32) for value in scalars + row])
        self._skipped = skipped
        self._weights = [p.detach().clone() for p in state.model.parameters()]  # before the optimizer step

    def _layer_row(self, state: State, algorithm: GradClipAlgo | None) -> list[Tensor]:
        """Each parameter's grad norm: the algorithm's pre-clip measurement on the steps it logs one, else
        measured here (no clipping: the pre-clip norms; with clipping: after it)."""
        logged = None if algorithm is None else algorithm.last_layer_norms
        layer = logged if logged is not None and logged is not self._used else grad_norms_by_name(state.model)
        self._used = logged
        nan = torch.tensor(math.nan)
        by_name = dict(zip(layer.names, layer.norms.cpu().unbind(), strict=True)) if layer.names else {}
        return [by_name.get(name, nan) for name in self.layer_names]

    def batch_end(self, state: State, logger: Logger) -> None:
        assert self._values is not None
        change = [p.detach() - w for p, w in zip(state.model.parameters(), self._weights, strict=True)]
        update = get_total_norm(change, 2.0).detach().cpu().to(torch.float32)
        values = torch.cat([self._values, update.reshape(1)]).tolist()
        update_norm = values.pop()
        step = int(state.timestamp.batch.value)
        record = LMStepRecord(
            step=step,
            loss=float(state.total_loss_dict.get("loss/train/total", math.nan)),
            grad_norm=values[0],
            clipped_grad_norm=values[1],
            threshold=values[2],
            skip_limit=values[3],
            clipped=bool(values[4]),
            skipped=bool(self._skipped),
            max_attention_logit=values[5],
            update_norm=update_norm,
        )
        self.records.append(record)
        csv.writer(self._files[0]).writerow(asdict(record).values())
        if self.layer_norms:
            self.layer_rows.append(values[6:])
            csv.writer(self._files[1]).writerow([step, *values[6:]])

    def eval_end(self, state: State, logger: Logger) -> None:
        values = state.eval_metric_values
        if EVAL_METRIC in values:
            step = int(state.timestamp.batch.value)
            if not self.evals or self.evals[-1].step != step:
                loss, log_partition = (float(values[name]) for name in (EVAL_METRIC, LOG_PARTITION_METRIC))
                self.evals.append(EvalRecord(step, loss, log_partition))

    def close(self, state: State, logger: Logger) -> None:
        for file in self._files:
            file.close()
        self._files = []
        with (self.folder / EVAL_FILE).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(f.name for f in fields(EvalRecord))
            writer.writerows(astuple(record) for record in self.evals)


def _network(state: State) -> ByteTransformer:
    model = state.model
    assert isinstance(model, LanguageModel)
    return model.net


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
    config: RunConfig,
    parts: RunParts,
    *,
    progress_bar: bool = True,
    layer_norms: bool = True,
    plot: bool = True,
) -> LanguageModelResult:
    """Train a language-model run into a new run folder: ``config.yaml``, ``metrics.csv``,
    ``layer_norms.csv`` (with ``layer_norms``), ``eval.csv``, ``summary.json`` and ``metrics.png`` (with
    ``plot``)."""
    from gradclip_algo.train.lm_plot import plot_lm_run  # matplotlib only when a run ends

    folder = create_run_folder(Path(config.run_folder), config.run_name)
    print(f"run folder: {folder}", flush=True)
    OmegaConf.save(OmegaConf.create(to_dict(config)), folder / CONFIG_FILE)
    recorder = LanguageModelRecorder(folder, layer_norms=layer_norms)
    trainer = make_trainer(config, parts, [recorder], run_name=folder.name, progress_bar=progress_bar)
    trainer.eval()  # the loss at initialisation: step 0
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
    if plot:
        plot_lm_run(result, folder / PLOT_FILE)
    return result
