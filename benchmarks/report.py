"""Markdown tables of the results, and the description of the machine they were measured on."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from benchmarks.compile_time import LATER_CALLS, Compilation
from benchmarks.implementations import FLOOR, OURS, OURS_VALUE_VARIANTS, REFERENCE
from benchmarks.optimizer_step import (
    FOLD_FLOOR,
    FOLDED,
    SCALE_ONLY,
    STEP_ALONE,
    TORCH,
    UNFOLDED,
    StepResult,
)
from benchmarks.trainer_overhead import COMPOSER, NO_CLIPPING, StepTime
from benchmarks.trainer_overhead import OURS as OURS_ALGORITHM

MS = 1e3


@dataclass(frozen=True)
class Row:
    """One implementation of one clipping type: its timed calls and the peak memory of one call."""

    clipping_type: str
    label: str
    seconds: list[float]
    peak_extra_bytes: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def quartiles_ms(self) -> str:
        if len(self.seconds) < 2:
            return "-"
        low, _, high = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return f"{low * MS:.1f}-{high * MS:.1f}"


@dataclass(frozen=True)
class CaseResult:
    """The rows of one parameter set on one device and dtype, with what the rules clipped there."""

    title: str
    grad_bytes: int
    thresholds: dict[str, float]
    clipped_fraction: dict[str, float]
    rows: list[Row]
    graphs: tuple[int, int] = (0, 0)
    """Graphs torch had compiled before the timed rounds and after them (equal: no recompile)."""

    def median_s(self, clipping_type: str, label: str) -> float:
        return next(r.median_s for r in self.rows if (r.clipping_type, r.label) == (clipping_type, label))

    def floor_rows(self) -> list[Row]:
        """The floor candidates, fastest first."""
        return sorted((row for row in self.rows if row.clipping_type == FLOOR), key=lambda row: row.median_s)


def case_table(result: CaseResult) -> str:
    """Median time, quartiles, ``ours ÷ this`` and peak extra memory per implementation; the floor row
    repeats under every clipping type with that type's ``ours ÷ floor``."""
    lines = [
        f"### {result.title}",
        "",
        "| clipping | implementation | median ms | quartiles ms | ours ÷ this "
        "| peak extra memory, % of grads |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    floor = result.floor_rows()
    for clipping_type in result.thresholds:
        ours = result.median_s(clipping_type, OURS)
        for row in [*(row for row in result.rows if row.clipping_type == clipping_type), floor[0]]:
            ratio = "1" if row.label == OURS else f"{ours / row.median_s:.2f}"
            memory = 100 * row.peak_extra_bytes / result.grad_bytes
            lines.append(
                f"| {clipping_type} | {row.label} | {row.median_s * MS:.1f} | {row.quartiles_ms()} | {ratio} "
                f"| {memory:.2f} % ({row.peak_extra_bytes / 2**20:.1f} MiB) |"
            )
    candidates = ", ".join(
        f"{row.label.removeprefix(FLOOR).strip(' ()')} {row.median_s * MS:.1f}" for row in floor
    )
    lines += ["", f"Floor candidates, median ms: {candidates}."]
    labels = {row.label for row in result.rows if row.clipping_type == "value"}
    for label, what in OURS_VALUE_VARIANTS.items():
        if label in labels:
            seconds = result.median_s("value", label)
            ratio = seconds / result.median_s("value", REFERENCE["value"])
            lines += [
                "",
                f"value {what} (`{label.removeprefix(OURS + ', ')}`): {seconds * MS:.1f} ms = "
                f"{ratio:.2f} x torch clip_grad_value_, {seconds / floor[0].median_s:.2f} x the floor.",
            ]
    clipped = ", ".join(
        f"{name} λ = {result.thresholds[name]:.4g} ({share:.0%} clipped)"
        for name, share in result.clipped_fraction.items()
    )
    lines += [
        "",
        f"Thresholds, and what ours clipped (norm: all or nothing; value: elements; adaptive: units): "
        f"{clipped}.",
        "",
        f"Graphs compiled by torch.compile in this process before the timed rounds: {result.graphs[0]}; "
        f"during them: {result.graphs[1] - result.graphs[0]}.",
    ]
    return "\n".join(lines)


def compile_table(title: str, cold: list[Compilation], warm: list[Compilation]) -> str:
    """Per clipping type: the first call in a fresh process with an empty and with a filled Inductor
    cache, a later call, the graphs compiled, and the recompiles on other sizes."""
    lines = [
        f"### Compiled kernels, first calls in a fresh process: {title}, CPU float32",
        "",
        "| clipping | first call, empty cache, s | first call, cache on disk, s | second call, ms "
        f"| graphs compiled | recompiles over {LATER_CALLS} calls on other sizes |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    compiled_before = 0
    for first, again in zip(cold, warm, strict=True):
        lines.append(
            f"| {first.clipping_type} | {first.first_s:.1f} | {again.first_s:.1f} | {again.second_s * MS:.1f} "
            f"| {first.graphs[0] - compiled_before} | {first.recompiles} (cache on disk: {again.recompiles}) |"
        )
        compiled_before = first.graphs[2]
    lines.append(
        "\nOne process per column; a type's first call includes importing and starting the compiler where it "
        "is the first to compile (norm runs first). Graphs: `torch._dynamo.utils.counters['stats']"
        "['unique_graphs']`."
    )
    return "\n".join(lines)


STEP_TARGET = 0.4
"""Ours folded: its added cost over the step alone at most this share of torch clip_grad_norm_'s."""
TRAINER_TARGETS = {"norm": 0.5, "value": 1.0, "adaptive": 1.0}
"""Per clipping type: GradClipAlgo's step overhead at most this share of Composer GradientClipping's."""


def _quartiles_ms(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return f"{low * MS:.2f}-{high * MS:.2f}"


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator > 0 else "n/a (torch added <= 0)"


def optimizer_step_table(result: StepResult, targets: bool = True) -> str:
    """Median, quartiles and added cost over the step alone per case; ours added ÷ torch added (with its
    target where ``targets``)."""
    lines = [
        f"### Clipping + fused AdamW step: {result.title}",
        "",
        "| case | median ms | quartiles ms | added over step alone, ms (quartiles) | added ÷ torch added |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    torch_added = result.added_median(TORCH)
    for label, seconds in result.seconds.items():
        if label == STEP_ALONE:
            added, ratio = "-", "-"
        else:
            added = f"{result.added_median(label) * MS:+.2f} ({_quartiles_ms(result.added(label))})"
            ratio = _ratio(result.added_median(label), torch_added)
        lines.append(
            f"| {label} | {statistics.median(seconds) * MS:.2f} | {_quartiles_ms(seconds)} | {added} | {ratio} |"
        )
    rounds = len(result.seconds[STEP_ALONE])
    lines += [
        "",
        f"Norm threshold λ = {result.threshold:.4g} (half the grads' norm: every case clips). Medians over "
        f"{rounds} interleaved rounds; the added cost is the median over rounds of (case - step alone) in "
        "the same round.",
    ]
    if SCALE_ONLY in result.seconds:
        lines.append(
            f"\n`{SCALE_ONLY}` isolates what the fused kernel adds when handed a `grad_scale`: it writes the "
            "unscaled grads back into `.grad`, so a fold saves torch's separate rescaling pass (a read and "
            "a write of every grad) but still pays one write inside the step."
        )
    if FOLD_FLOOR in result.seconds:
        lines.append(
            f"\n`{FOLD_FLOOR}` is the least any fold can add: the norm needs one read of every grad (here the "
            "cheapest: `sum` per grad on CPU, `torch._foreach_norm` on CUDA), and the kernel's write-back "
            "follows."
        )
    if FOLDED in result.seconds:
        ours = result.added_median(FOLDED)
        lines.append(
            f"\nOurs folded added ÷ torch added: **{_ratio(ours, torch_added)}** ("
            + (f"target <= {STEP_TARGET}; " if targets else "")
            + f"the least a fold adds: {_ratio(result.added_median(FOLD_FLOOR), torch_added)}); "
            f"unfolded: {_ratio(result.added_median(UNFOLDED), torch_added)}."
        )
    else:
        lines.append(
            "\nThe folded cases are missing: this gradclip_algo has no `fold_into` (folding); "
            f"ours unfolded added ÷ torch added: {_ratio(result.added_median(UNFOLDED), torch_added)}."
        )
    return "\n".join(lines)


def overhead_table(title: str, step_times: list[StepTime], targets: bool = True) -> str:
    """Step time and overhead per configuration; per clipping type ours-overhead ÷ Composer-overhead."""
    lines = [
        f"### Composer training step: {title}, CPU",
        "",
        "| configuration | median step ms | overhead ms (quartiles over rounds) | overhead, % of step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for step in step_times:
        spread = f" ({_quartiles_ms(list(step.differences_s))})" if step.label != NO_CLIPPING else ""
        label = f"{step.label}, folded" if step.folded else step.label
        lines.append(
            f"| {label} | {step.median_s * MS:.2f} | {step.overhead_s * MS:+.2f}{spread} "
            f"| {100 * step.overhead_share:+.1f} % |"
        )
    first = step_times[0]
    lines.append(
        f"\n{first.blocks} timed rounds of a block of {first.steps_per_block} steps per configuration, in one "
        "Trainer; overhead: the median over rounds of the block's mean time from the backward pass's end to "
        "BATCH_END, minus that of the block without clipping. `folded`: the configuration's last step was "
        "folded into the optimizer."
    )
    ratios = []
    for clipping_type, target in TRAINER_TARGETS.items():
        by_family = {
            step.configuration.family: step.overhead_s
            for step in step_times
            if step.configuration.clipping_type == clipping_type and "log_interval" not in step.label
        }
        if COMPOSER in by_family and OURS_ALGORITHM in by_family:
            ratio = _ratio(by_family[OURS_ALGORITHM], by_family[COMPOSER]).replace("torch", "Composer")
            ratios.append(f"{clipping_type} **{ratio}**" + (f" (target <= {target})" if targets else ""))
    if ratios:
        lines.append(f"\nGradClipAlgo overhead ÷ Composer GradientClipping overhead: {', '.join(ratios)}.")
    composer = {
        s.configuration.clipping_type: s.overhead_s for s in step_times if s.configuration.family == COMPOSER
    }
    for step in step_times:
        kind = step.configuration.clipping_type
        if step.configuration.family == OURS_ALGORITHM and "log_interval" in step.label and kind in composer:
            ratio = _ratio(step.overhead_s, composer[kind]).replace("torch", "Composer")
            lines.append(f"\n{step.label} overhead ÷ Composer GradientClipping('{kind}') overhead: {ratio}.")
    return "\n".join(lines)


def host_sync_table(title: str, syncs: dict[str, float], device_type: str) -> str:
    """Host synchronisations per step of every case."""
    what = (
        "synchronising CUDA calls (`torch.cuda.set_sync_debug_mode('warn')`)"
        if device_type == "cuda"
        else "reads of a tensor into Python (`item`, `bool`, `float`, `tolist`, `nonzero`, ...)"
    )
    lines = [f"### Host syncs per clip + step: {title}", "", "| case | syncs per step |", "| --- | ---: |"]
    lines += [f"| {label} | {count:g} |" for label, count in syncs.items()]
    lines.append(f"\nCounted: {what}, after the spike window is half full.")
    if device_type == "cpu":
        lines.append(
            "On CPU `tests/test_no_sync.py` asserts none for the folded cases (its guard raises on any "
            "such read); the GPU check asserts it with `torch.cuda.set_sync_debug_mode('error')`."
        )
    return "\n".join(lines)


def setups_table(title: str, seconds: dict[str, list[float]]) -> str:
    """Median ms per clipper set-up and its ratio to the first (plain norm clipping)."""
    medians = {label: statistics.median(values) for label, values in seconds.items()}
    base_label, base = next(iter(medians.items()))
    lines = [f"### {title}", "", f"| set-up | median ms | ÷ {base_label} |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {median * MS:.1f} | {median / base:.2f} |" for label, median in medians.items()]
    rounds = len(next(iter(seconds.values())))
    lines.append(f"\nMedians over {rounds} interleaved rounds; the grads are restored before every call.")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str:
    """The git commit measured, marked when gradclip_algo/ differs from it (read-only git calls)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # no index refresh written
        return subprocess.run(
            ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "gradclip_algo").strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit (not a git checkout)"
    return f"commit {commit}" + (" with uncommitted changes" if changed else "")


def machine_description(start_load: tuple[float, ...] | None = None) -> str:
    """CPU, cores, torch threads, GPU, library versions, load average (at the start and end) and the date."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    loads = [("at the start", start_load)] if start_load is not None else []
    loads.append(("at the end", os.getloadavg()))
    load = "; ".join(f"{when}: {', '.join(f'{value:.2f}' for value in values)}" for when, values in loads)
    packages = ", ".join(f"{name} {version(name)}" for name in ("torch", "mosaicml", "timm"))
    return (
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"GPU: {gpu}\n"
        f"- Software: Python {platform.python_version()}, {packages}; gradclip_algo at {code_version()}\n"
        f"- Load average (1, 5, 15 min) {load}\n"
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


METHOD = """\
How it is measured (`benchmarks/`):

- Parameters: weights ~ N(0, 0.02²); the grads of tensor i ~ N(0, s²) with s cycling through 1e-5, 1e-4,
  1e-3, 1e-2, 1e-1, so each rule clips some tensors or units and leaves others. Thresholds are chosen so
  clipping is active (the share clipped is under each table).
- Before timing, each implementation runs once (the warm-up) and its clipped grads are compared with the
  reference's (torch for norm and value, timm for adaptive); the run stops if any differs by more than
  1e-4 (fp32; 2e-2 in bf16) of the largest grad element.
- Timing: before every timed call the grads are restored from a saved copy (untimed). One round calls
  every implementation of every clipping type and the floor once, in an order rotated by one each round;
  one untimed round first, then the timed rounds. Medians and quartiles over the rounds; every ratio is
  taken between medians of the same run. On CUDA, times come from CUDA events between synchronisations.
- Floor: the least any clipping rule must do, over the same grads in the same run: one read of every
  element, then one in-place read-modify-write of every element (a multiply by a 0-d tensor holding 1).
  Each pair of a read pass (`torch._foreach_norm`; `torch.dot(g, g)` per tensor; `g.sum()` per tensor) and
  a write pass (`torch._foreach_mul_`; `g.mul_` per tensor) is one timed call; the fastest pair is the
  floor. On CUDA the floor runs over one flat buffer of the same bytes, i.e. at the device's measured
  bandwidth, free of per-tensor kernel launches.
- Peak extra memory: the high-water mark of bytes torch allocates during one call beyond what was live
  before it, in % of the grads' bytes. On CPU it is read from the allocator events that
  `torch.profiler.profile(profile_memory=True)` records (+bytes per allocation, -bytes per free, summed in
  time order); on CUDA from `torch.cuda.max_memory_allocated`.
- Clipping + fused AdamW step: each case (the step alone, torch's `clip_grad_norm_` then the step,
  ours folded into the optimizer, ours unfolded, ours folded with `skip_spikes=6`) has its own copy of
  the parameters and its own `torch.optim.AdamW(params, lr=1e-4, fused=True)`; all share one set of grad
  tensors, restored before every call (untimed). One round calls every case once, in an order rotated
  by one each round; one untimed round first (it also creates the optimizer states). A case's added
  cost is the median over rounds of (its time - the step alone's in the same round); the ratio divides
  ours by torch's. Folded, ours computes the norm and hands the coefficient to the fused kernel as
  `grad_scale` (no pass over the grads to rescale them); skipping becomes the kernel's `found_inf`. The
  least a fold can add is timed too: one read of every grad, then the step handed `grad_scale = 1`.
- Training-step overhead: one Composer `Trainer` trains on through blocks of steps, each block under one
  configuration's algorithms (no clipping, Composer's `GradientClipping`, `gradclip_algo.GradClipAlgo`
  with its defaults: it folds into the optimizer where it is exact), so that every configuration runs on
  the same parameters and optimizer state in the same memory; a round runs every configuration once, in
  an order rotated by one each round (one warm-up round). A step is timed from `BATCH_START` to
  `BATCH_END` (its median per block gives the step time) and from the end of the backward pass to
  `BATCH_END` (clipping, the optimizer's update, logging: the part clipping changes, free of the forward
  and backward passes' noise). The overhead is the median over rounds of (the block's mean of the latter
  - the block without clipping's); a block's steps are a multiple of every `log_interval`, so each block
  holds the same share of logging steps. Two models: a small MLP with SGD (fixed per-step costs such as logging show), and
  `nn.Embedding(50257, 768)` (dense grads) + a linear head under fused AdamW: a cheap forward and large
  parameters, so the step is dominated by passes over the grads and the optimizer's.
- Host syncs: the cases of the optimizer-step table on a tiny model, counted per step after the spike
  window is half full; on CUDA every synchronising call (sync debug mode), on CPU every read of a tensor
  into Python.
- Compiled kernels: `gradclip_algo` rows run with the compiled kernels ('value' and the norm; the default
  on CPU), `gradclip_algo, eager kernels` rows with them turned off (`set_compiled_kernels(False)`), in
  the same rounds. Their first calls are timed in fresh processes: with an empty Inductor cache, then with the
  cache the first process left on disk.
- Reading the tables: `ours ÷ this` is gradclip_algo's median over this row's median, so below 1 means
  gradclip_algo is faster; on the floor row it is how many floors gradclip_algo takes.
"""


def results_markdown(machine: str, tables: list[str], written_by: str = "`make bench`") -> str:
    """The whole RESULTS.md: machine, method, then every table."""
    return (
        "\n\n".join(["# Benchmark results", f"Written by {written_by}.", machine, METHOD.rstrip(), *tables])
        + "\n"
    )
