"""Time per Composer training step with and without a clipping algorithm (small MLP, CPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from composer import Callback, Logger, State, Trainer
from composer.algorithms import GradientClipping as ComposerGradientClipping
from composer.core import Algorithm
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradclip_algo import GradClipAlgo

FEATURES, HIDDEN, CLASSES, BATCH = 256, 1024, 10, 64
THRESHOLD = 1.0
NO_CLIPPING = "no clipping"


class StepTimer(Callback):
    """Seconds from ``BATCH_START`` to ``BATCH_END`` of every step: forward, backward, clipping, step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def batch_start(self, state: State, logger: Logger) -> None:
        self._start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        self.seconds.append(time.perf_counter() - self._start)


@dataclass(frozen=True)
class StepTime:
    """Median step time of one configuration and its overhead over the run without clipping."""

    label: str
    median_s: float
    overhead_s: float
    overhead_share: float
    blocks: int
    steps_per_block: int


CONFIGURATIONS: dict[str, Callable[[], list[Algorithm]]] = {
    NO_CLIPPING: list,
    f"composer GradientClipping('norm', {THRESHOLD})": lambda: [ComposerGradientClipping("norm", THRESHOLD)],
    f"gradclip_algo GradClipAlgo('norm', {THRESHOLD})": lambda: [GradClipAlgo("norm", THRESHOLD)],
    f"gradclip_algo GradClipAlgo('norm', {THRESHOLD}, log_interval=100)": lambda: [
        GradClipAlgo("norm", THRESHOLD, log_interval=100)
    ],
}
"""Each makes the algorithms of one ``Trainer``; gradclip_algo's logs every step unless told otherwise."""


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )


def mlp_parameter_count() -> int:
    return sum(param.numel() for param in _mlp().parameters())


def _trainer(algorithms: list[Algorithm], timer: StepTimer) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32 * BATCH, FEATURES, generator=generator)
    targets = torch.randint(0, CLASSES, (32 * BATCH,), generator=generator)
    model = ComposerClassifier(_mlp(), num_classes=CLASSES)
    return Trainer(
        model=model,
        train_dataloader=DataLoader(TensorDataset(inputs, targets), batch_size=BATCH),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
        algorithms=algorithms,
        callbacks=[timer],
        loggers=[],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        seed=0,
    )


def measure_step_overhead(blocks: int, steps_per_block: int) -> list[StepTime]:
    """Median step time per configuration, and its overhead over the run without clipping.

    Blocks of ``steps_per_block`` steps alternate between the configurations (one ``Trainer`` each, trained
    on with ``fit(duration=...)``); the first block is warm-up. The overhead is the median over blocks of
    the difference of block medians, so a drift in machine load between blocks cancels out.
    """
    timers = {label: StepTimer() for label in CONFIGURATIONS}
    trainers = {label: _trainer(make(), timers[label]) for label, make in CONFIGURATIONS.items()}
    block_medians: dict[str, list[float]] = {label: [] for label in CONFIGURATIONS}
    for block in range(blocks + 1):
        for label, trainer in trainers.items():
            timers[label].seconds.clear()
            trainer.fit(duration=f"{steps_per_block}ba")
            if block > 0:
                block_medians[label].append(statistics.median(timers[label].seconds))
    for trainer in trainers.values():
        trainer.close()
    baseline = block_medians[NO_CLIPPING]
    results = []
    for label, medians in block_medians.items():
        overhead = statistics.median(m - b for m, b in zip(medians, baseline, strict=True))
        median = statistics.median(medians)
        results.append(
            StepTime(label, median, overhead, overhead / statistics.median(baseline), blocks, steps_per_block)
        )
    return results
