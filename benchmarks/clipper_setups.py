"""The statistics-driven types and spike skipping, timed against plain norm clipping on the same grads.

Each set-up is one ``GradientClipper`` called step after step (its statistics carry over, as in training);
the grads are restored before every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from benchmarks.cases import Case, grad_restorer, make_model
from benchmarks.timing import round_robin
from gradclip_algo import GradientClipper


@dataclass(frozen=True)
class Setup:
    """A clipper set-up: ``GradientClipper(clipping_type, threshold, **options)``, called ``with_stats``."""

    label: str
    clipping_type: str
    threshold: float
    options: dict[str, Any] = field(default_factory=dict)
    with_stats: bool = True


SETUPS = (
    Setup("norm", "norm", 1.0),
    Setup("quantile", "quantile", math.inf),
    Setup("zscore", "zscore", math.inf),
    Setup("adagc", "adagc", math.inf),
    Setup("norm, skip_spikes=6", "norm", 1.0, {"skip_spikes": 6.0}),
    Setup("value, with_stats=False", "value", 1e-3, with_stats=False),
    Setup("value, with_stats=False, skip_spikes=6", "value", 1e-3, {"skip_spikes": 6.0}, with_stats=False),
)
"""Plain norm first: the other rows are read against it."""


def _call(clipper: GradientClipper, model: nn.Module, with_stats: bool) -> None:
    clipper(model, with_stats=with_stats)


def time_setups(case: Case, rounds: int, warmup_rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every set-up on the CPU in fp32, interleaved round-robin."""
    model = make_model(case, torch.device("cpu"), torch.float32)
    calls = {
        setup.label: partial(
            _call,
            GradientClipper(setup.clipping_type, setup.threshold, **setup.options),
            model,
            setup.with_stats,
        )
        for setup in SETUPS
    }
    return round_robin(calls, grad_restorer(model), torch.device("cpu"), rounds, warmup_rounds)
