"""Time per Composer training step with and without a clipping algorithm (CPU).

Two models: a small MLP with SGD (a step of a few ms, so fixed per-step costs such as logging show), and
an embedding with dense grads plus a small head under fused AdamW (large parameters, a cheap forward:
the step is dominated by passes over the grads and the optimizer's, where clipping's passes show).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from composer import Callback, Logger, State, Trainer
from composer.algorithms import GradientClipping as ComposerGradientClipping
from composer.core import Algorithm, Event
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradclip_algo import GradClipAlgo

NO_CLIPPING = "no clipping"
COMPOSER = "composer"
OURS = "gradclip_algo"


class StepTimer(Callback):
    """Seconds of every step: ``seconds`` from ``BATCH_START`` to ``BATCH_END`` (forward, backward, clipping,
    the optimizer's update, logging) and ``tail_seconds`` from the last ``AFTER_BACKWARD`` to ``BATCH_END``
    (clipping, the update, logging: the part of the step that clipping changes, without the noise of the
    forward and backward passes)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tail_seconds: list[float] = []
        self._start = self._backward_end = 0.0

    def clear(self) -> None:
        self.seconds.clear()
        self.tail_seconds.clear()

    def batch_start(self, state: State, logger: Logger) -> None:
        self._start = time.perf_counter()

    def after_backward(self, state: State, logger: Logger) -> None:
        self._backward_end = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self._start)
        self.tail_seconds.append(now - self._backward_end)


@dataclass(frozen=True)
class Configuration:
    """The algorithms of one ``Trainer``: ``family`` (none, composer, gradclip_algo) and clipping type."""

    label: str
    family: str
    clipping_type: str | None
    make: Callable[[], list[Algorithm]]


def no_clipping() -> Configuration:
    return Configuration(NO_CLIPPING, NO_CLIPPING, None, list)


def composer_clipping(clipping_type: str, threshold: float) -> Configuration:
    return Configuration(
        f"composer GradientClipping('{clipping_type}', {threshold})",
        COMPOSER,
        clipping_type,
        lambda: [ComposerGradientClipping(clipping_type, threshold)],
    )


def our_clipping(clipping_type: str, threshold: float, log_interval: int = 1) -> Configuration:
    extra = f", log_interval={log_interval}" if log_interval != 1 else ""
    return Configuration(
        f"gradclip_algo GradClipAlgo('{clipping_type}', {threshold}{extra})",
        OURS,
        clipping_type,
        lambda: [GradClipAlgo(clipping_type, threshold, log_interval=log_interval)],
    )


class MeanEmbedding(nn.Module):
    """Token ids (batch, tokens) to the mean of their embeddings (batch, width); dense grads."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens).mean(dim=1)


@dataclass(frozen=True)
class TrainerCase:
    """A model, its data and optimizer, and the configurations timed on it."""

    title: str
    make_module: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator, int], torch.Tensor]
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    classes: int
    batch: int
    configurations: tuple[Configuration, ...]
    targets: bool = False
    """Whether the per-type ratio ours ÷ Composer is read against the targets (the embedding case)."""

    def parameter_count(self) -> int:
        return sum(param.numel() for param in self.make_module().parameters())

    def describe(self) -> str:
        return f"{self.title} ({self.parameter_count() / 1e6:.2f} M parameters)"


def mlp_case(features: int = 256, hidden: int = 1024, classes: int = 10, batch: int = 64) -> TrainerCase:
    def module() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    return TrainerCase(
        title="MLP, SGD",
        make_module=module,
        make_inputs=lambda generator, n: torch.randn(n, features, generator=generator),
        make_optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
        classes=classes,
        batch=batch,
        configurations=(
            no_clipping(),
            composer_clipping("norm", 1.0),
            our_clipping("norm", 1.0),
            our_clipping("norm", 1.0, log_interval=100),
        ),
    )


def embedding_case(
    vocab: int = 50257, width: int = 768, classes: int = 10, batch: int = 8, tokens: int = 16
) -> TrainerCase:
    """``nn.Embedding(vocab, width)`` (dense grads: every step writes and clips all vocab x width) + a head."""

    def module() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(MeanEmbedding(vocab, width), nn.Linear(width, classes))

    thresholds = {"norm": 1.0, "value": 1e-3, "adaptive": 0.01}
    return TrainerCase(
        title=f"nn.Embedding({vocab}, {width}) + Linear head, fused AdamW",
        make_module=module,
        make_inputs=lambda generator, n: torch.randint(0, vocab, (n, tokens), generator=generator),
        make_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
        classes=classes,
        batch=batch,
        configurations=(
            no_clipping(),
            *(
                configuration
                for clipping_type, threshold in thresholds.items()
                for configuration in (
                    composer_clipping(clipping_type, threshold),
                    our_clipping(clipping_type, threshold),
                )
            ),
            our_clipping("value", thresholds["value"], log_interval=10),
        ),
        targets=True,
    )


@dataclass(frozen=True)
class StepTime:
    """Median step time of one configuration and its overhead over the run without clipping (the median
    of ``differences_s``, one per round)."""

    configuration: Configuration
    median_s: float
    overhead_s: float
    overhead_share: float
    blocks: int
    steps_per_block: int
    differences_s: tuple[float, ...] = ()
    folded: bool = False
    """Whether a GradClipAlgo of the configuration folded its last step into the optimizer."""

    @property
    def label(self) -> str:
        return self.configuration.label


class Switch(Algorithm):
    """The algorithms of one configuration at a time (``active``), so that every configuration trains the
    same parameters and optimizer state, in the same memory, in one ``Trainer``: the step times then differ
    by what the algorithms do, not by where the allocator put each run's tensors."""

    def __init__(self, configurations: dict[str, list[Algorithm]]) -> None:
        super().__init__()
        self.configurations = configurations
        self.active = next(iter(configurations))

    def _algorithms(self, event: Event) -> list[Algorithm]:
        if event == Event.INIT:  # every configuration's algorithms see the Trainer's set-up
            return [algorithm for algorithms in self.configurations.values() for algorithm in algorithms]
        return self.configurations[self.active]

    def match(self, event: Event, state: State) -> bool:
        return any(algorithm.match(event, state) for algorithm in self._algorithms(event))

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Run the active algorithms with ``state.algorithms`` as a Trainer of theirs alone would hold it
        (GradClipAlgo folds only where no other algorithm of its event could touch the grads)."""
        algorithms = self._algorithms(event)
        held = list(state.algorithms)
        state.algorithms = algorithms
        try:
            for algorithm in algorithms:
                if algorithm.match(event, state):
                    algorithm.apply(event, state, logger)
        finally:
            state.algorithms = held


def _trainer(case: TrainerCase, switch: Switch, timer: StepTimer) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    inputs = case.make_inputs(generator, 32 * case.batch)
    targets = torch.randint(0, case.classes, (32 * case.batch,), generator=generator)
    model = ComposerClassifier(case.make_module(), num_classes=case.classes)
    return Trainer(
        model=model,
        train_dataloader=DataLoader(TensorDataset(inputs, targets), batch_size=case.batch),
        optimizers=case.make_optimizer(list(model.parameters())),
        algorithms=[switch],
        callbacks=[timer],
        loggers=[],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        seed=0,
    )


def measure_step_overhead(case: TrainerCase, blocks: int, steps_per_block: int) -> list[StepTime]:
    """Step time per configuration and its overhead over the run without clipping.

    One ``Trainer`` trains on through blocks of ``steps_per_block`` steps (``fit(duration=...)``), each block
    under one configuration's algorithms (:class:`Switch`); a round runs every configuration once, in an
    order rotated by one each round, and the first round is warm-up. The step time is the median over
    rounds of a block's median step. The overhead is the median over rounds of the difference between a
    block's mean of :attr:`StepTimer.tail_seconds` and the block without clipping's: the mean counts the
    steps that log as often as they occur (``steps_per_block`` a multiple of every ``log_interval`` gives
    each block the same share of them), and the median over rounds cancels drifts in machine load and
    stalls of single blocks.
    """
    configurations = case.configurations
    timer = StepTimer()
    switch = Switch({c.label: c.make() for c in configurations})
    trainer = _trainer(case, switch, timer)
    steps: dict[str, list[float]] = {c.label: [] for c in configurations}
    tails: dict[str, list[float]] = {c.label: [] for c in configurations}
    labels = [c.label for c in configurations]
    for block in range(blocks + 1):
        shift = block % len(labels)  # rotated by one each round: no configuration always follows another
        for label in labels[shift:] + labels[:shift]:
            switch.active = label
            timer.clear()
            trainer.fit(duration=f"{steps_per_block}ba")
            if block > 0:
                steps[label].append(statistics.median(timer.seconds))
                tails[label].append(statistics.fmean(timer.tail_seconds))
    trainer.close()
    baseline = statistics.median(steps[NO_CLIPPING])
    results = []
    for configuration in configurations:
        pairs = zip(tails[configuration.label], tails[NO_CLIPPING], strict=True)
        differences = tuple(tail - base for tail, base in pairs)
        overhead = statistics.median(differences)
        results.append(
            StepTime(
                configuration,
                statistics.median(steps[configuration.label]),
                overhead,
                overhead / baseline,
                blocks,
                steps_per_block,
                differences,
                folded=any(
                    getattr(getattr(algorithm, "last_stats", None), "folded", False)
                    for algorithm in switch.configurations[configuration.label]
                ),
            )
        )
    return results
