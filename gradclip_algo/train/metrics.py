"""Per-step training records (loss, gradient norm before and after clipping) and the summary of a run."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch import Tensor

from gradclip_algo.algorithm import GradClipAlgo
from gradclip_algo.norms import get_total_norm

LOSS_KEY = "loss/train/total"  # Composer's loss of the whole batch, all microbatches and ranks


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step. ``step`` counts from 1; norms are of the gradients of the whole batch.

    ``grad_norm`` is measured before clipping, ``clipped_grad_norm`` (L2) is what the optimizer then used;
    ``clipped`` says whether clipping changed anything. Without clipping both norms are equal.
    """

    step: int
    loss: float
    grad_norm: float
    clipped_grad_norm: float
    clipped: bool


CSV_COLUMNS = tuple(f.name for f in fields(StepRecord))


class StepMetricsRecorder(Callback):
    """Writes one :class:`StepRecord` per optimizer step to a CSV file and keeps them in ``records``.

    Both norms are taken at ``Event.AFTER_TRAIN_BATCH``, the event where :class:`GradClipAlgo` clips.
    Composer runs every algorithm at an event before any callback, so this callback sees the grads after
    clipping, i.e. the ones ``optimizer.step()`` gets: their L2 norm is ``clipped_grad_norm``. The norm
    before clipping is gone by then, so it comes from the algorithm's ``last_stats`` (the norm it measured
    for its rule; the recorder sets its ``stats_every_step``) when a ``GradClipAlgo`` runs, and equals the
    measured one when none does. Reading the values (a host sync) waits until ``Event.BATCH_END``, once
    per step.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[StepRecord] = []
        self._file: IO[str] | None = None
        self._clipping: GradClipAlgo | None = None
        self._norms: Tensor | None = None
        self._clipped: Tensor | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        clippers = [algo for algo in state.algorithms if isinstance(algo, GradClipAlgo)]
        self._clipping = clippers[0] if clippers else None
        if self._clipping is not None:  # the pre-clip norm of every step, not only of the logged ones
            self._clipping.stats_every_step = True
        self._file = self.path.open("w", newline="")
        csv.writer(self._file).writerow(CSV_COLUMNS)

    def after_train_batch(self, state: State, logger: Logger) -> None:
        params = list(state.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        after = get_total_norm(grads, 2.0, params[0].device)
        if self._clipping is None or self._clipping.last_stats is None:
            before, clipped = after, torch.zeros((), dtype=torch.bool, device=after.device)
        else:
            stats = self._clipping.last_stats
            before, clipped = stats.grad_norm.to(after.device), stats.clipped_fraction.to(after.device) > 0
        self._norms, self._clipped = torch.stack([before, after]), clipped

    def batch_end(self, state: State, logger: Logger) -> None:
        assert self._file is not None and self._norms is not None
        grad_norm, clipped_grad_norm = self._norms.tolist()
        record = StepRecord(
            step=int(state.timestamp.batch.value),
            loss=float(state.total_loss_dict.get(LOSS_KEY, math.nan)),
            grad_norm=grad_norm,
            clipped_grad_norm=clipped_grad_norm,
            clipped=bool(self._clipped),
        )
        self.records.append(record)
        csv.writer(self._file).writerow(asdict(record).values())
        self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class RunSummary:
    """What a run came to; ``nan`` where no finite value exists.

    ``max_grad_norm`` is the largest pre-clip norm (``inf`` if one overflowed); ``first_nonfinite_step``
    is the first step whose loss or pre-clip norm was inf or NaN (``None`` if none was).
    """

    steps: int
    final_loss: float
    best_loss: float
    eval_mse: float
    max_grad_norm: float
    clipped_steps: int
    first_nonfinite_step: int | None

    def describe(self) -> str:
        """One line: the numbers of the summary."""
        nonfinite = self.first_nonfinite_step
        return (
            f"{self.steps} steps, final loss {self.final_loss:.4f}, best loss {self.best_loss:.4f}, "
            f"eval MSE {self.eval_mse:.4f}, max pre-clip grad norm {self.max_grad_norm:.3g}, "
            f"{self.clipped_steps} steps clipped"
            + ("" if nonfinite is None else f", inf/NaN from step {nonfinite}")
        )


def summarize(records: Sequence[StepRecord], eval_mse: float) -> RunSummary:
    """Summary of a run's records and its final evaluation MSE."""
    finite_losses = [r.loss for r in records if math.isfinite(r.loss)]
    norms = [r.grad_norm for r in records if not math.isnan(r.grad_norm)]
    nonfinite = [r.step for r in records if not (math.isfinite(r.loss) and math.isfinite(r.grad_norm))]
    return RunSummary(
        steps=len(records),
        final_loss=records[-1].loss if records else math.nan,
        best_loss=min(finite_losses, default=math.nan),
        eval_mse=eval_mse,
        max_grad_norm=max(norms, default=math.nan),
        clipped_steps=sum(r.clipped for r in records),
        first_nonfinite_step=nonfinite[0] if nonfinite else None,
    )
