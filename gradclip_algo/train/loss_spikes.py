"""Loss spikes in a training-loss series: which steps spike, how many spikes, and a spike score.

The definition follows the spike score of OLMo 2 and AdaGC (the share of steps whose value lies far above
a rolling average of the steps before it), with a window sized for runs of a few hundred steps:

- Step ``t`` (counting from 1) is a *spike step* when ``t > window`` and its loss exceeds the mean of the
  ``window`` losses before it by more than ``sigmas`` times their standard deviation (ddof 1), or is inf
  or NaN. Non-finite losses in the window are left out of its mean and standard deviation.
- A *loss spike* is a maximal run of spike steps, runs less than ``merge_gap`` steps apart counting as
  one: the number of spikes is the number of such episodes.
- The *spike score* is ``100 · spike steps / judged steps`` (judged: steps after the first ``window``),
  a percentage; 0 means no step ever spiked.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

SPIKE_WINDOW = 50
SPIKE_SIGMAS = 4.0
MERGE_GAP = 10


@dataclass(frozen=True)
class SpikeReport:
    """The spike steps of a series, its number of spikes and its spike score (percent)."""

    steps: tuple[int, ...]
    spikes: int
    score: float


def spike_steps(
    losses: Sequence[float], window: int = SPIKE_WINDOW, sigmas: float = SPIKE_SIGMAS
) -> list[int]:
    """The spike steps (1-based) of ``losses``, as defined in the module docstring."""
    found = []
    for index in range(window, len(losses)):
        loss = losses[index]
        before = [value for value in losses[index - window : index] if math.isfinite(value)]
        if not math.isfinite(loss) or (
            len(before) >= 2 and loss > statistics.fmean(before) + sigmas * statistics.stdev(before)
        ):
            found.append(index + 1)
    return found


def count_episodes(steps: Sequence[int], merge_gap: int = MERGE_GAP) -> int:
    """How many runs the sorted ``steps`` make, steps less than ``merge_gap`` apart joining one run."""
    return sum(1 for i, step in enumerate(steps) if i == 0 or step - steps[i - 1] >= merge_gap)


def spike_report(
    losses: Sequence[float],
    window: int = SPIKE_WINDOW,
    sigmas: float = SPIKE_SIGMAS,
    merge_gap: int = MERGE_GAP,
) -> SpikeReport:
    """Spike steps, number of spikes and spike score of a training-loss series."""
    steps = spike_steps(losses, window, sigmas)
    judged = max(len(losses) - window, 0)
    score = 100.0 * len(steps) / judged if judged else 0.0
    return SpikeReport(tuple(steps), count_episodes(steps, merge_gap), score)
