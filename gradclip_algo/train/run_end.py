"""How a run of the app ends: it completes, stops at its first non-finite loss, or is interrupted by SIGINT /
SIGTERM; either way after a whole optimizer step, its files written and ``summary.json`` saying which.

:class:`RunGuard` is the last callback of every run's ``Trainer``: after each step's records are written it
stops the run where the loss is inf or NaN (unless the config's ``stop_on_nonfinite_loss`` is false) or a
stop was requested (:mod:`gradclip_algo.train.interrupt`). :func:`fit` trains until then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger

from gradclip_algo.train.interrupt import Interrupted, requested, signal_name, stop_signals

LOSS_KEY = "loss/train/total"  # Composer's loss of the whole batch, all microbatches and ranks
COMPLETED, NONFINITE_LOSS, INTERRUPTED = "completed", "nonfinite_loss", "interrupted"


class _Stop(Exception):
    """Raised by :class:`RunGuard` at ``Event.BATCH_END`` to end ``Trainer.fit`` after a whole step."""

    def __init__(self, status: str, step: int) -> None:
        super().__init__(status, step)
        self.status = status
        self.step = step


class RunGuard(Callback):
    """Ends the run after the step whose loss is inf or NaN (where ``stop_on_nonfinite_loss``), or after
    the step during which a stop was requested. It reads the loss from the device once per step."""

    def __init__(self, stop_on_nonfinite_loss: bool) -> None:
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch.value)
        loss = state.total_loss_dict.get(LOSS_KEY)
        if self.stop_on_nonfinite_loss and loss is not None and not math.isfinite(float(loss)):
            raise _Stop(NONFINITE_LOSS, step)
        if requested() is not None:
            raise _Stop(INTERRUPTED, step)


@dataclass(frozen=True)
class RunEnd:
    """Why a run ended (``status``: ``'completed'``, ``'nonfinite_loss'`` or ``'interrupted'``) and the last
    optimizer step it recorded; ``signum``: the signal of an interrupted run."""

    status: str
    last_step: int
    signum: int | None = None

    def summary_fields(self) -> dict[str, Any]:
        """What ``summary.json`` records of the end: ``status``, ``interrupted``, ``last_step``."""
        return {"status": self.status, "interrupted": self.status == INTERRUPTED, "last_step": self.last_step}

    def describe(self) -> str:
        """``''`` for a completed run, else a few words on why it stopped."""
        if self.status == NONFINITE_LOSS:
            return (
                f"stopped at step {self.last_step}: the loss is inf or NaN (stop_on_nonfinite_loss=false "
                "trains on)"
            )
        if self.status == INTERRUPTED:
            return f"interrupted by {signal_name(self.signum or 0)} after step {self.last_step}"
        return ""

    def report(self, folder: Path) -> None:
        """For a run that ended early: one line on stdout after a non-finite loss, :class:`Interrupted`
        naming ``folder`` and the last step after a signal."""
        if self.status == NONFINITE_LOSS:
            print(f"{folder}: {self.describe()}", flush=True)
        if self.status == INTERRUPTED and self.signum is not None:
            raise Interrupted(
                self.signum,
                (
                    f"interrupted by {signal_name(self.signum)}: {folder} holds steps 1-{self.last_step}, "
                    'marked "interrupted": true in summary.json',
                ),
            )


def fit(trainer: Trainer) -> RunEnd:
    """``trainer.fit()`` (its last callback a :class:`RunGuard`), SIGINT and SIGTERM taken as stop requests;
    closes the trainer (its callbacks close their files) and returns how the run ended.

    Call it inside :func:`~gradclip_algo.train.interrupt.stop_signals`, around the writing of the run's
    files, so that a signal during that writing is still a stop request."""
    with stop_signals():
        try:
            trainer.fit()
            end = RunEnd(COMPLETED, int(trainer.state.timestamp.batch.value))
        except _Stop as stop:
            end = RunEnd(stop.status, stop.step, requested() if stop.status == INTERRUPTED else None)
        finally:
            trainer.close()
    return end
