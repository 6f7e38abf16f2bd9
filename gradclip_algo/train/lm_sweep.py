"""A learning-rate sweep of language-model runs and what it comes to: LR sensitivity, the largest trainable
learning rate, the instability signals, tables and verdicts (no torch, no Composer).

The sweep trains every clipping set-up at every learning rate of a grid and every seed, on the same data
and initialisation per seed. Following Wortsman et al. (2023, arXiv 2309.14322), a set-up's curve
``L(lr)`` is its final evaluation loss per learning rate, and

    LR sensitivity = mean over the grid's lr of ( min(L(lr), L0) - L* ),

where ``L0`` is the loss at initialisation (a run that ends above it, or at inf/NaN, counts as ``L0``) and
``L*`` the lowest ``min(L(lr), L0)`` of the curve. On a grid evenly spaced in ``log lr`` the mean is the
paper's expectation over the learning rate. It is computed per seed; tables give the mean over the seeds and their
range. The *largest trainable learning rate* of a set-up is the largest learning rate of the grid at which its
seed-mean curve lies within ``margin`` of the curve's lowest point.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradclip_algo.train.lm_results import LanguageModelSummary

MARGIN = 0.1
"""nats per byte above a set-up's best loss that still count as trainable."""


def capped_loss(loss: float, initial: float) -> float:
    """``min(loss, initial)``; a loss that is inf or NaN counts as ``initial`` (the run learned nothing)."""
    return min(loss, initial) if math.isfinite(loss) else initial


def lr_sensitivity(losses: Sequence[float], initial: float) -> float:
    """Wortsman et al.'s LR sensitivity of one curve: the mean over its learning rates of
    ``capped_loss(L(lr), L0) - L*``, ``L*`` the curve's lowest capped loss."""
    capped = [capped_loss(loss, initial) for loss in losses]
    best = min(capped)
    return statistics.fmean(value - best for value in capped)


def largest_trainable_lr(lrs: Sequence[float], losses: Sequence[float], margin: float) -> float:
    """The largest of ``lrs`` whose loss is within ``margin`` of the lowest finite one (``nan`` if none is
    finite)."""
    finite = [loss for loss in losses if math.isfinite(loss)]
    if not finite:
        return math.nan
    best = min(finite)
    return max(
        lr for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss) and loss <= best + margin
    )


@dataclass(frozen=True)
class Sweep:
    """The summaries of a sweep, by ``(set-up, learning rate, seed)``. ``setups[0]`` is the baseline (no
    clipping); ``clipping`` describes each set-up in a few words; ``lrs`` ascend."""

    setups: tuple[str, ...]
    clipping: dict[str, str]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    runs: dict[tuple[str, float, int], LanguageModelSummary]

    def values(self, setup: str, lr: float, value: Callable[[LanguageModelSummary], float]) -> list[float]:
        """``value`` of the run of ``setup`` at ``lr``, one per seed."""
        return [value(self.runs[setup, lr, seed]) for seed in self.seeds]

    def curve(self, setup: str, seed: int) -> list[float]:
        """Final evaluation loss per learning rate of one seed."""
        return [self.runs[setup, lr, seed].final_eval_loss for lr in self.lrs]

    def initial_loss(self, seed: int) -> float:
        """L0 of a seed: its runs share the initialisation, and so the loss at step 0."""
        return self.runs[self.setups[0], self.lrs[0], seed].initial_eval_loss

    def sensitivities(self, setup: str) -> list[float]:
        """LR sensitivity of ``setup``, one per seed."""
        return [lr_sensitivity(self.curve(setup, seed), self.initial_loss(seed)) for seed in self.seeds]

    def mean_curve(self, setup: str) -> list[float]:
        """Per learning rate, the mean over the seeds of the capped final evaluation loss."""
        return [
            statistics.fmean(
                capped_loss(self.runs[setup, lr, seed].final_eval_loss, self.initial_loss(seed))
                for seed in self.seeds
            )
            for lr in self.lrs
        ]

    def largest_lr(self, setup: str, margin: float) -> float:
        """The largest trainable learning rate of the seed-mean curve."""
        return largest_trainable_lr(self.lrs, self.mean_curve(setup), margin)

    def largest_lr_per_seed(self, setup: str, margin: float) -> list[float]:
        return [largest_trainable_lr(self.lrs, self.curve(setup, seed), margin) for seed in self.seeds]


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _spread(values: Sequence[float], digits: int) -> str:
    """``mean [min, max]`` of ``values``, or how many are not finite."""
    bad = sum(not math.isfinite(value) for value in values)
    if bad:
        return f"inf/nan in {bad}"
    if len(values) == 1:
        return _number(values[0], digits)
    mean = statistics.fmean(values)
    return f"{_number(mean, digits)} [{_number(min(values), digits)}, {_number(max(values), digits)}]"


def _significant(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _lr_header(sweep: Sweep) -> list[str]:
    return ["set-up", "clipping", *(f"lr {lr:g}" for lr in sweep.lrs)]


def loss_table(sweep: Sweep) -> str:
    """Final evaluation loss per set-up (rows) and learning rate (columns): mean [min, max] over seeds."""
    rows = [
        [setup, sweep.clipping[setup]]
        + [_spread(sweep.values(setup, lr, lambda s: s.final_eval_loss), 3) for lr in sweep.lrs]
        for setup in sweep.setups
    ]
    return _table(_lr_header(sweep), rows)


def seed_mean_table(sweep: Sweep, value: Callable[[LanguageModelSummary], float]) -> str:
    """``value`` per set-up and learning rate, the mean over seeds to three significant digits."""
    rows = [
        [setup, sweep.clipping[setup]]
        + [_significant(statistics.fmean(sweep.values(setup, lr, value))) for lr in sweep.lrs]
        for setup in sweep.setups
    ]
    return _table(_lr_header(sweep), rows)


def sensitivity_table(sweep: Sweep, margin: float = MARGIN) -> str:
    """Per set-up: LR sensitivity (mean [min, max] over seeds), the best seed-mean loss and its learning rate,
    the largest trainable learning rate (seed-mean curve, then per seed), loss spikes over the sweep."""
    header = [
        "set-up",
        "clipping",
        "LR sensitivity",
        "best loss",
        "at lr",
        f"largest lr within {margin:g}",
        "per seed",
        "loss spikes",
    ]
    rows = []
    for setup in sweep.setups:
        curve = sweep.mean_curve(setup)
        best = min(range(len(curve)), key=curve.__getitem__)
        spikes = [sum(sweep.runs[setup, lr, seed].loss_spikes for lr in sweep.lrs) for seed in sweep.seeds]
        rows.append(
            [
                setup,
                sweep.clipping[setup],
                _spread(sweep.sensitivities(setup), 3),
                _number(curve[best], 3),
                f"{sweep.lrs[best]:g}",
                f"{sweep.largest_lr(setup, margin):g}",
                ", ".join(f"{lr:g}" for lr in sweep.largest_lr_per_seed(setup, margin)),
                _spread([float(count) for count in spikes], 1),
            ]
        )
    return _table(header, rows)


FOCUS_COLUMNS: dict[str, Callable[[LanguageModelSummary], float]] = {
    "final eval loss": lambda s: s.final_eval_loss,
    "max attention logit": lambda s: s.max_attention_logit,
    "log Z": lambda s: s.log_partition,
    "steps clipped": lambda s: s.clipped_steps,
    "steps skipped": lambda s: s.skipped_steps,
    "mean update norm": lambda s: s.mean_update_norm,
}


def focus_table(sweep: Sweep, lr: float) -> str:
    """At one learning rate, per set-up: the seed means of :data:`FOCUS_COLUMNS` (three significant
    digits; the loss to three decimals)."""
    rows = []
    for setup in sweep.setups:
        cells = [setup, sweep.clipping[setup]]
        for column, value in FOCUS_COLUMNS.items():
            mean = statistics.fmean(sweep.values(setup, lr, value))
            cells.append(_number(mean, 3) if column == "final eval loss" else _significant(mean))
        rows.append(cells)
    return _table(["set-up", "clipping", *FOCUS_COLUMNS], rows)


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) or "(no set-up)"


def _on_every_seed(
    sweep: Sweep, value: Callable[[str], list[float]]
) -> tuple[list[str], list[str], list[str]]:
    """The clipped set-ups whose per-seed ``value`` is below the baseline's on every seed, above it on every
    seed, and neither."""
    base = value(sweep.setups[0])
    below, above, neither = [], [], []
    for setup in sweep.setups[1:]:
        pairs = list(zip(value(setup), base, strict=True))
        if all(a < b for a, b in pairs):
            below.append(setup)
        elif all(a > b for a, b in pairs):
            above.append(setup)
        else:
            neither.append(setup)
    return below, above, neither


def range_verdicts(sweep: Sweep, margin: float = MARGIN) -> list[str]:
    """Which set-ups widen or narrow the trainable range (on the seed-mean curve, then on every seed), and
    whose LR sensitivity is lower or higher than the baseline's on every seed."""
    base, others = sweep.setups[0], sweep.setups[1:]
    reach = sweep.largest_lr(base, margin)
    wider = [s for s in others if sweep.largest_lr(s, margin) > reach]
    narrower = [s for s in others if sweep.largest_lr(s, margin) < reach]
    same = [s for s in others if s not in wider + narrower]
    seeds = "every seed" if len(sweep.seeds) > 1 else "its one seed"
    narrower_each, wider_each, _ = _on_every_seed(sweep, lambda s: sweep.largest_lr_per_seed(s, margin))
    lower, higher, neither = _on_every_seed(sweep, sweep.sensitivities)
    lines = [
        f"largest trainable lr (seed-mean loss within {margin:g} nats/byte of the set-up's best), {base}: "
        f"{reach:g}; larger: {_names(wider)}; smaller: {_names(narrower)}; the same: {_names(same)}",
        f"largest trainable lr larger than {base}'s on {seeds}: {_names(wider_each)}; smaller on {seeds}: "
        f"{_names(narrower_each)}",
        f"LR sensitivity lower than {base}'s on {seeds}: {_names(lower)}; higher on {seeds}: {_names(higher)}; "
        f"neither: {_names(neither)}",
    ]
    if not wider_each:
        lines.append(f"no clipping set-up makes a larger learning rate trainable on {seeds}")
    return lines


def loss_verdicts(sweep: Sweep) -> list[str]:
    """Per clipped set-up, the learning rates at which its final loss is below, and above, the baseline's on
    every seed."""
    base = sweep.setups[0]
    lines = []
    for setup in sweep.setups[1:]:
        pairs = {
            lr: list(zip(sweep.values(setup, lr, _final), sweep.values(base, lr, _final), strict=True))
            for lr in sweep.lrs
        }
        lower = [f"{lr:g}" for lr, pair in pairs.items() if all(a < b for a, b in pair)]
        higher = [f"{lr:g}" for lr, pair in pairs.items() if all(a > b for a, b in pair)]
        lines.append(
            f"{setup}: final loss below {base}'s on every seed at lr {', '.join(lower) or '(none)'}; above at "
            f"lr {', '.join(higher) or '(none)'}"
        )
    return lines


def _final(summary: LanguageModelSummary) -> float:
    """The final evaluation loss, inf where it is not finite (so that it compares as the worst)."""
    return summary.final_eval_loss if math.isfinite(summary.final_eval_loss) else math.inf


def instability_verdicts(sweep: Sweep, lr: float) -> list[str]:
    """At ``lr``: the baseline's instability signals against those at its best learning rate, and what each
    clipped set-up did to them and to the optimizer's step size (seed means)."""
    base = sweep.setups[0]
    curve = sweep.mean_curve(base)
    best_lr = sweep.lrs[min(range(len(curve)), key=curve.__getitem__)]

    def mean(setup: str, at: float, value: Callable[[LanguageModelSummary], float]) -> float:
        return statistics.fmean(sweep.values(setup, at, value))

    attention = lambda s: s.max_attention_logit  # noqa: E731
    update = lambda s: s.mean_update_norm  # noqa: E731
    steps = sweep.runs[base, lr, sweep.seeds[0]].steps
    lines = [
        f"{base} at lr {lr:g}: max attention logit {_significant(mean(base, lr, attention))} (at its best lr "
        f"{best_lr:g}: {_significant(mean(base, best_lr, attention))}), log Z "
        f"{_significant(mean(base, lr, lambda s: s.log_partition))}, final eval loss "
        f"{_number(mean(base, lr, lambda s: s.final_eval_loss), 3)} (best {_number(min(curve), 3)})"
    ]
    for setup in sweep.setups[1:]:
        lines.append(
            f"{setup} at lr {lr:g}: clipped {mean(setup, lr, lambda s: s.clipped_steps):.3g} of {steps} steps, "
            f"skipped {mean(setup, lr, lambda s: s.skipped_steps):.3g}; max attention logit "
            f"{mean(setup, lr, attention) / mean(base, lr, attention):.3g}x {base}'s, mean update norm "
            f"{mean(setup, lr, update) / mean(base, lr, update):.3g}x"
        )
    return lines
