"""What a language-model run records and comes to: its per-step records, its evaluations, its summary and
its result, the data that :mod:`~gradclip_algo.train.lm_run` writes and :mod:`~gradclip_algo.train.lm_plot`
draws."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradclip_algo.train.loss_spikes import spike_report


@dataclass(frozen=True)
class LMStepRecord:
    """One optimizer step (``step`` from 1). ``threshold``: the global-norm threshold the rule held the
    pre-clip norm against (``nan`` where it has none: no clipping, adagc's per-tensor caps);
    ``skip_limit``: the norm above which ``skip_spikes`` skips (``nan`` when off or still warming up);
    ``max_attention_logit``: the largest attention logit of the step's forward pass (the last
    microbatch's), over every layer, head, sequence and causal query-key pair; ``update_norm``: the L2 norm
    of the optimizer step's change of all parameters together, ``‖θ_t - θ_{t-1}‖``."""

    step: int
    loss: float
    grad_norm: float
    clipped_grad_norm: float
    threshold: float
    skip_limit: float
    clipped: bool
    skipped: bool
    max_attention_logit: float
    update_norm: float


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation after ``step`` optimizer steps (0: the initialisation): the mean next-byte
    cross-entropy (nats per byte) and the mean log-partition ``log Z`` of the output logits
    (:class:`~gradclip_algo.train.lm_model.OutputLogPartition`) over the evaluation windows."""

    step: int
    loss: float
    log_partition: float


@dataclass(frozen=True)
class LanguageModelSummary:
    """What a language-model run came to; ``nan`` where no finite value exists.

    ``initial_eval_loss``, ``final_eval_loss`` and ``best_eval_loss``: the evaluation cross-entropy (nats
    per byte) at initialisation, at the end and the lowest of the trained evaluations; ``log_partition``:
    the final evaluation's mean ``log Z``; ``max_attention_logit``: the largest attention logit of any
    training step; ``mean_update_norm``: the mean over steps of ``update_norm``; ``loss_spikes``, ``spike_score``: see :mod:`gradclip_algo.train.loss_spikes`.
    """

    steps: int
    initial_eval_loss: float
    final_eval_loss: float
    best_eval_loss: float
    log_partition: float
    max_attention_logit: float
    mean_update_norm: float
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
            f"{self.best_eval_loss:.4f}, log Z {self.log_partition:.3g}, max attention logit "
            f"{self.max_attention_logit:.3g}, {self.loss_spikes} loss spikes (spike score "
            f"{self.spike_score:.2f}), {self.clipped_steps} steps clipped, {self.skipped_steps} skipped, max "
            f"pre-clip grad norm {self.max_grad_norm:.3g}"
            + (
                ""
                if self.first_nonfinite_step is None
                else f", inf/NaN from step {self.first_nonfinite_step}"
            )
        )


def _finite_max(values: Sequence[float]) -> float:
    return max((value for value in values if not math.isnan(value)), default=math.nan)


def summarize_lm(records: Sequence[LMStepRecord], evals: Sequence[EvalRecord]) -> LanguageModelSummary:
    """Summary of a run's step records and its evaluations."""
    spikes = spike_report([r.loss for r in records])
    initial = [e for e in evals if e.step == 0]
    trained = [e for e in evals if e.step > 0]
    nonfinite = [r.step for r in records if not (math.isfinite(r.loss) and math.isfinite(r.grad_norm))]
    return LanguageModelSummary(
        steps=len(records),
        initial_eval_loss=initial[0].loss if initial else math.nan,
        final_eval_loss=trained[-1].loss if trained else math.nan,
        best_eval_loss=min((e.loss for e in trained if math.isfinite(e.loss)), default=math.nan),
        log_partition=trained[-1].log_partition if trained else math.nan,
        max_attention_logit=_finite_max([r.max_attention_logit for r in records]),
        mean_update_norm=statistics.fmean(r.update_norm for r in records) if records else math.nan,
        loss_spikes=spikes.spikes,
        spike_score=spikes.score,
        clipped_steps=sum(r.clipped and not r.skipped for r in records),
        skipped_steps=sum(r.skipped for r in records),
        max_grad_norm=_finite_max([r.grad_norm for r in records]),
        first_nonfinite_step=nonfinite[0] if nonfinite else None,
    )


@dataclass(frozen=True)
class LanguageModelResult:
    """A finished language-model run: its folder, records, evaluations, summary and clipping set-up.

    ``layer_rows``: per step, the grad L2 norm of each of ``layer_names`` (empty when the run did not
    record them)."""

    folder: Path
    records: list[LMStepRecord]
    layer_names: list[str]
    layer_rows: list[list[float]]
    evals: list[EvalRecord]
    summary: LanguageModelSummary
    clipping: str
