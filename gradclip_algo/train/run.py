"""One training run from a checked :class:`RunConfig`: build every part, make the run folder, train, record.

Everything that can reject a config (the algorithms block, the optimizer's options) is built before the run
folder exists, so a bad config leaves nothing behind.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core import Algorithm, Callback
from composer.models import ComposerModel
from composer.utils import dist, reproducibility
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import DataLoader, Dataset

from gradclip_algo.algorithm import GradClipAlgo
from gradclip_algo.config import build_algorithms
from gradclip_algo.train.adding_problem import train_and_eval_sets
from gradclip_algo.train.lm_model import LanguageModel
from gradclip_algo.train.metrics import RunSummary, StepRecord
from gradclip_algo.train.model import AddingProblemModel
from gradclip_algo.train.run_config import (
    DURATION_PATTERN,
    LanguageModelTaskConfig,
    RunConfig,
    RunConfigError,
    TransformerConfig,
)
from gradclip_algo.train.run_end import RunEnd, RunGuard
from gradclip_algo.train.text_data import train_and_eval_windows

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "metrics.png"

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


@dataclass(frozen=True)
class RunParts:
    """What the ``Trainer`` gets, built (and so checked) before the run folder is made."""

    model: ComposerModel
    optimizer: torch.optim.Optimizer
    algorithms: list[Algorithm]
    train_loader: DataLoader
    eval_loader: DataLoader
    scheduler: LRScheduler | None = None


@dataclass(frozen=True)
class RunResult:
    """A finished run: its folder, its per-step records and their summary.

    ``clipping`` describes the clipping set-up (``'none'`` without one); ``threshold`` is λ for norm
    clipping, the value the pre-clip norm is compared with, else ``None``; ``end``: how it ended.
    """

    folder: Path
    records: list[StepRecord]
    summary: RunSummary
    clipping: str
    threshold: float | None
    end: RunEnd


def _loader(dataset: Dataset, batch_size: int, seed: int, train: bool) -> DataLoader:
    sampler = dist.get_sampler(dataset, shuffle=train, drop_last=train, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train)


def build_parts(config: RunConfig) -> RunParts:
    """Model (seeded), optimizer, algorithms and data loaders of ``config``.

    Raises:
        RunConfigError: the algorithms block or the optimizer's options are rejected.
    """
    try:
        algorithms = build_algorithms(config.algorithms)
    except (TypeError, ValueError) as err:
        raise RunConfigError(str(err)) from err
    torch.set_num_threads(config.cpu_threads)
    reproducibility.seed_all(config.seed)
    model = _model(config)
    opt = config.optimizer
    try:
        optimizer = OPTIMIZERS[opt.name](model.parameters(), lr=opt.lr, **opt.options)
    except (TypeError, ValueError) as err:
        raise RunConfigError(f"optimizer.options: {opt.name} rejected {opt.options!r}: {err}") from err
    task = config.task
    if isinstance(task, LanguageModelTaskConfig):
        train_set, eval_set = train_and_eval_windows(
            task.text, task.context_length, task.eval_fraction, task.eval_windows
        )
        eval_batch_size = len(eval_set)
    else:
        train_set, eval_set = train_and_eval_sets(
            task.train_samples, task.eval_samples, task.sequence_length, config.seed
        )
        eval_batch_size = task.eval_samples
    train_loader = _loader(train_set, task.batch_size, config.seed, train=True)
    return RunParts(
        model=model,
        optimizer=optimizer,
        algorithms=algorithms,
        train_loader=train_loader,
        eval_loader=_loader(eval_set, eval_batch_size, config.seed, train=False),
        scheduler=lr_scheduler(config, optimizer, len(train_loader)),
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (1, 2, ...) as a fraction of ``optimizer.lr``.

    ``step / warmup_steps`` during the warm-up (``step <= warmup_steps``); after it 1 (``constant``) or
    ``(1 + cos(π · (step - warmup_steps) / (total_steps - warmup_steps))) / 2`` (``cosine``: 1 at the end of
    the warm-up, 0 at step ``total_steps``).
    """
    if step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer, batches: int) -> LRScheduler | None:
    """The schedule of ``config.optimizer`` (see :func:`lr_factor`) for a ``Trainer`` that steps it once per
    batch, or ``None`` for a constant learning rate. ``batches``: training batches per epoch, for a
    ``max_duration`` in epochs.

    Step ``k + 1`` runs at the lr the scheduler holds after ``k`` calls of ``step()``, so a ``Trainer`` that
    stops early (the calibration) has seen the same learning rates as the run's first steps.
    """
    opt = config.optimizer
    if opt.schedule == "constant" and opt.warmup_steps == 0:
        return None
    count, unit = DURATION_PATTERN.match(config.max_duration).groups()  # type: ignore[union-attr]
    total = int(count) * (batches if unit == "ep" else 1)
    return LambdaLR(optimizer, lambda taken: lr_factor(taken + 1, opt.warmup_steps, total, opt.schedule))


def _model(config: RunConfig) -> ComposerModel:
    """The task's model: the RNN for the adding problem, the transformer for the language model."""
    model = config.model
    if isinstance(model, TransformerConfig):
        assert isinstance(config.task, LanguageModelTaskConfig)
        return LanguageModel(
            config.task.context_length, model.d_model, model.n_layers, model.n_heads, model.mlp_ratio
        )
    return AddingProblemModel(model.hidden_size, model.recurrent_init_gain)


def create_run_folder(parent: Path, name: str) -> Path:
    """A new, empty ``parent/name``; if that exists, the first of ``name-2``, ``name-3``, ... that does not.

    ``mkdir`` without ``exist_ok`` makes the claim atomic, so two runs never share a folder.

    Raises:
        RunConfigError: the folder cannot be made (a file in the way, no permission, ...): one line.
    """
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for number in itertools.count(1):
            folder = parent / (name if number == 1 else f"{name}-{number}")
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return folder
    except OSError as err:
        raise RunConfigError(f"{parent}: cannot create a run folder there: {err.strerror or err}") from err
    raise AssertionError("unreachable")


def describe_clipping(algorithms: list[Algorithm]) -> tuple[str, float | None]:
    """``('norm λ=0.5', 0.5)`` for norm clipping, ``('value λ=1', None)`` for other rules, ``('none', None)``."""
    for algorithm in algorithms:
        if isinstance(algorithm, GradClipAlgo):
            clipper = algorithm.clipper
            threshold = clipper.clipping_threshold if clipper.clipping_type == "norm" else None
            return f"{clipper.clipping_type} λ={clipper.clipping_threshold:g}", threshold
    return "none", None


def _json_number(value: float | int | None) -> float | int | str | None:
    """JSON has no inf or NaN: those are written as the strings ``'inf'`` / ``'nan'`` (``float()`` reads them)."""
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def make_trainer(
    config: RunConfig,
    parts: RunParts,
    callbacks: list[Callback],
    *,
    evaluate: bool = True,
    max_duration: str | None = None,
    **options: Any,
) -> Trainer:
    """The ``Trainer`` of a run: ``parts``, the duration, lr schedule, seed and microbatching of ``config``,
    no loggers.

    ``callbacks`` are followed by a :class:`~gradclip_algo.train.run_end.RunGuard`, which ends the run (see
    :func:`~gradclip_algo.train.run_end.fit`) at a non-finite loss, as ``config`` says, or on a stop request.
    ``evaluate`` adds the evaluation set, run once at the end; ``options`` go to ``Trainer`` as they are.
    """
    interval = (
        f"{config.task.eval_interval}ba" if isinstance(config.task, LanguageModelTaskConfig) else "1dur"
    )
    evaluation = {"eval_dataloader": parts.eval_loader, "eval_interval": interval} if evaluate else {}
    return Trainer(
        model=parts.model,
        train_dataloader=parts.train_loader,
        max_duration=max_duration or config.max_duration,
        optimizers=parts.optimizer,
        schedulers=parts.scheduler,
        step_schedulers_every_batch=True,
        algorithms=parts.algorithms,
        callbacks=[*callbacks, RunGuard(config.stop_on_nonfinite_loss)],
        loggers=[],
        seed=config.seed,
        device_train_microbatch_size=config.device_train_microbatch_size,
        **evaluation,
        **options,
    )
