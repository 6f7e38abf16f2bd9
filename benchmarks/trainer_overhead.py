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

from gradclip_algo import GradientClipping

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
    """Median step time of one configuration and its difference to the run without clipping."""

    label: str
    median_s: float
    overhead_s: float
    overhead_share: float
    steps: int


CONFIGURATIONS: dict[str, Callable[[], list[Algorithm]]] = {
    NO_CLIPPING: list,
    f"composer GradientClipping('norm', {THRESHOLD})": lambda: [ComposerGradientClipping("norm", THRESHOLD)],
    f"gradclip_algo GradientClipping('norm', {THRESHOLD})": lambda: [GradientClipping("norm", THRESHOLD)],
}


def mlp_parameter_count() -> int:
    return (FEATURES + 1) * HIDDEN + (HIDDEN + 1) * HIDDEN + (HIDDEN + 1) * CLASSES


def _trainer(algorithms: list[Algorithm], timer: StepTimer) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32 * BATCH, FEATURES, generator=generator)
    targets = torch.randint(0, CLASSES, (32 * BATCH,), generator=generator)
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )
    model = ComposerClassifier(module, num_classes=CLASSES)
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
    """Median step time per configuration; blocks of ``steps_per_block`` steps alternate between the
    configurations (one ``Trainer`` each, trained on with ``fit(duration=...)``); the first block is warm-up.
    """
    timers = {label: StepTimer() for label in CONFIGURATIONS}
    trainers = {label: _trainer(make(), timers[label]) for label, make in CONFIGURATIONS.items()}
    for block in range(blocks + 1):
        for label, trainer in trainers.items():
            trainer.fit(duration=f"{steps_per_block}ba")
            if block == 0:
                timers[label].seconds.clear()
    for trainer in trainers.values():
        trainer.close()
    medians = {label: statistics.median(timer.seconds) for label, timer in timers.items()}
    baseline = medians[NO_CLIPPING]
    return [
        StepTime(label, median, median - baseline, (median - baseline) / baseline, len(timers[label].seconds))
        for label, median in medians.items()
    ]
