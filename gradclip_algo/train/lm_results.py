"""What a language-model run records and comes to: its per-step records, its summary and its result, the
data that :mod:`~gradclip_algo.train.lm_run` writes and :mod:`~gradclip_algo.train.lm_plot` draws."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradclip_algo.train.loss_spikes import spike_report


@dataclass(frozen=True)
class LMStepRecord:
    """One optimizer step (``step`` from 1). ``threshold``: the global-norm threshold the rule held the
    pre-clip norm against (``nan`` where it has none: no clipping, adagc's per-tensor caps);
    ``skip_limit``: the norm above which ``skip_spikes`` skips (``nan`` when off or still warming up)."""

    step: int
    loss: float
    grad_norm: float
    clipped_grad_norm: float
    threshold: float
    skip_limit: float
    clipped: bool
    skipped: bool


@dataclass(frozen=True)
class LanguageModelSummary:
    """What a language-model run came to; ``nan`` where no finite value exists.

    ``final_eval_loss`` and ``best_eval_loss``: the last and the lowest evaluation cross-entropy (nats per
    byte); ``loss_spikes``, ``spike_score``: see :mod:`gradclip_algo.train.loss_spikes`.
    """

    steps: int
    final_eval_loss: float
    best_eval_loss: float
    loss_spikes: int
    spike_score: float
    clipped_steps: int
    skipped_steps: int
    max_grad_norm: float
    first_nonfinite_step: int | None

    def describe(self) -> str:
        """One line: the numbers of the summary."""
        return (
            f"{self.steps} steps, final eval loss {self.final_eval_loss:.4f}, best eval loss "
            f"{self.best_eval_loss:.4f}, {self.loss_spikes} loss spikes (spike score {self.spike_score:.2f}), "
            f"{self.clipped_steps} steps clipped, {self.skipped_steps} skipped, max pre-clip grad norm "
            f"{self.max_grad_norm:.3g}"
            + (
                ""
                if self.first_nonfinite_step is None
                else f", inf/NaN from step {self.first_nonfinite_step}"
            )
        )


def summarize_lm(records: Sequence[LMStepRecord], evals: Sequence[tuple[int, float]]) -> LanguageModelSummary:
    """Summary of a run's step records and its evaluations."""
    spikes = spike_report([r.loss for r in records])
    eval_losses = [value for _, value in evals]
    finite_evals = [value for value in eval_losses if math.isfinite(value)]
    norms = [r.grad_norm for r in records if not math.isnan(r.grad_norm)]
    nonfinite = [r.step for r in records if not (math.isfinite(r.loss) and math.isfinite(r.grad_norm))]
    return LanguageModelSummary(
        steps=len(records),
        final_eval_loss=eval_losses[-1] if eval_losses else math.nan,
        best_eval_loss=min(finite_evals, default=math.nan),
        loss_spikes=spikes.spikes,
        spike_score=spikes.score,
        clipped_steps=sum(r.clipped and not r.skipped for r in records),
        skipped_steps=sum(r.skipped for r in records),
        max_grad_norm=max(norms, default=math.nan),
        first_nonfinite_step=nonfinite[0] if nonfinite else None,
    )


@dataclass(frozen=True)
class LanguageModelResult:
    """A finished language-model run: its folder, records, evaluations, summary and clipping set-up."""

    folder: Path
    records: list[LMStepRecord]
    layer_names: list[str]
    layer_rows: list[list[float]]
    evals: list[tuple[int, float]]
    summary: LanguageModelSummary
    clipping: str
