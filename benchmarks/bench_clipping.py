"""Time gradclip_algo against torch.nn.utils, Composer and timm; print the tables and write RESULTS.md.

Run ``make bench`` or ``python -m benchmarks.bench_clipping [--smoke] [--output PATH]``. ``--smoke`` runs
every code path on tiny sizes in seconds (the timings then mean nothing) and writes only with ``--output``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks.cases import (
    FULL_CASES,
    GPT2_BLOCKS,
    GPT2_SMALL,
    SMOKE_BLOCKS,
    SMOKE_CASES,
    Case,
    clipping_thresholds,
    grad_restorer,
    make_model,
)
from benchmarks.clipper_setups import time_setups
from benchmarks.compile_time import compile_times, compiled_graphs
from benchmarks.host_syncs import count_syncs
from benchmarks.implementations import FLOOR, IMPLEMENTATIONS, deviations_from_reference, floor_candidates
from benchmarks.memory import peak_extra_bytes
from benchmarks.optimizer_step import time_optimizer_steps
from benchmarks.report import (
    CaseResult,
    Row,
    case_table,
    compile_table,
    host_sync_table,
    machine_description,
    optimizer_step_table,
    overhead_table,
    results_markdown,
    setups_table,
)
from benchmarks.timing import round_robin
from benchmarks.trainer_overhead import TrainerCase, embedding_case, measure_step_overhead, mlp_case
from gradclip_algo import apply_gradient_clipping

CPU_THREADS = 2
RESULTS = Path(__file__).with_name("RESULTS.md")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
"""Largest deviation from the reference implementation's grads, relative to the largest grad element.

Not tighter in fp32: torch's own norm of a 38.6 M-element fp32 tensor on CPU is off by ~3e-3 (its sum of
squares by ~5e-3, against fp64), so implementations that sum in another order differ by ~1e-5 here."""


@dataclass(frozen=True)
class TrainerRun:
    """A Composer training-step table: the case, its timed blocks and steps per block."""

    case: TrainerCase
    blocks: int
    steps_per_block: int


@dataclass(frozen=True)
class Settings:
    cases: tuple[Case, ...]
    setups_case: Case
    rounds: int
    warmup_rounds: int
    step_case: Case
    step_rounds: int
    sync_steps: int
    trainer_runs: tuple[TrainerRun, ...]


SYNC_CASE = SMOKE_CASES[0]
"""Host syncs per step do not depend on the sizes: counted on the tiny GPT-2 in every mode."""

FULL = Settings(
    FULL_CASES,
    GPT2_BLOCKS,
    rounds=30,
    warmup_rounds=1,
    step_case=GPT2_SMALL,
    step_rounds=30,
    sync_steps=5,
    # steps per block: a multiple of every log_interval of the case (100 and 10), see measure_step_overhead
    trainer_runs=(TrainerRun(mlp_case(), 12, 100), TrainerRun(embedding_case(), 20, 10)),
)
SMOKE = Settings(
    SMOKE_CASES,
    SMOKE_BLOCKS,
    rounds=2,
    warmup_rounds=1,
    step_case=SMOKE_CASES[0],
    step_rounds=2,
    sync_steps=1,
    trainer_runs=(
        TrainerRun(mlp_case(features=8, hidden=16), 1, 2),
        TrainerRun(embedding_case(vocab=64, width=8), 1, 2),
    ),
)


def device_runs() -> list[tuple[torch.device, torch.dtype]]:
    """CPU in fp32; with CUDA also the GPU in fp32 and bf16."""
    runs = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        runs += [(torch.device("cuda"), torch.float32), (torch.device("cuda"), torch.bfloat16)]
    return runs


def step_runs() -> list[tuple[torch.device, torch.dtype]]:
    """The optimizer-step and host-sync tables: CPU, and with CUDA the GPU, in fp32."""
    return [run for run in device_runs() if run[1] == torch.float32]


def benchmark_case(case: Case, device: torch.device, dtype: torch.dtype, settings: Settings) -> CaseResult:
    """Check every implementation against the reference, then time them and the floor, then their memory."""
    model = make_model(case, device, dtype)
    grads = [param.grad for param in model.parameters()]
    reset = grad_restorer(model)
    thresholds = clipping_thresholds(model)
    deviations = deviations_from_reference(model, reset, thresholds)
    disagreeing = {key: value for key, value in deviations.items() if value > TOLERANCE[dtype]}
    if disagreeing:
        raise RuntimeError(f"{case.name}: implementations disagree with the reference: {disagreeing}")
    clipped_fraction = {}
    for clipping_type, threshold in thresholds.items():
        reset()
        stats = apply_gradient_clipping(model, clipping_type, threshold)
        clipped_fraction[clipping_type] = stats.clipped_fraction.item()

    calls = {
        (clipping_type, impl.label): partial(impl.clip, model, thresholds[clipping_type])
        for clipping_type, implementations in IMPLEMENTATIONS.items()
        for impl in implementations
    }
    # On a GPU one flat buffer of the same bytes gives the bandwidth floor; per-tensor launches would set it.
    floor_tensors = grads if device.type == "cpu" else [torch.randn(case.numel, device=device).to(dtype)]
    calls.update({(FLOOR, label): call for label, call in floor_candidates(floor_tensors).items()})
    graphs_before = compiled_graphs()
    seconds = round_robin(calls, reset, device, settings.rounds, settings.warmup_rounds)
    graphs = (graphs_before, compiled_graphs())
    rows = []
    for key, call in calls.items():
        reset()
        rows.append(Row(*key, seconds=seconds[key], peak_extra_bytes=peak_extra_bytes(call, device)))
    return CaseResult(
        title=f"{case.describe()}, {device.type.upper()} {str(dtype).removeprefix('torch.')}",
        grad_bytes=sum(grad.numel() * grad.element_size() for grad in grads),
        thresholds=thresholds,
        clipped_fraction=clipped_fraction,
        rows=rows,
        graphs=graphs,
    )


SMOKE_NOTE = (
    "**Smoke run**: every code path on tiny sizes, a round or two each. The figures below check that the "
    "benchmark runs; as timings they mean nothing, and no target applies to them (`make bench` measures)."
)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; return (and print) the markdown written to ``--output``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and few repeats: checks, not timings"
    )
    parser.add_argument(
        "--output", type=Path, help=f"markdown file to write (default: {RESULTS}, not in --smoke)"
    )
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    output = args.output or (None if args.smoke else RESULTS)
    torch.set_num_threads(CPU_THREADS)
    start_load = os.getloadavg()
    targets = not args.smoke  # at smoke sizes the figures mean nothing, so no target is held against them

    tables = [SMOKE_NOTE] if args.smoke else []
    if args.smoke:
        print(SMOKE_NOTE, end="\n\n", flush=True)
    for device, dtype in device_runs():
        for case in settings.cases:
            tables.append(case_table(benchmark_case(case, device, dtype, settings)))
            print(tables[-1], end="\n\n", flush=True)
    if not args.smoke:  # fresh processes that compile: minutes, not seconds
        cold, warm = compile_times(GPT2_SMALL)
        tables.append(compile_table(GPT2_SMALL.describe(), cold, warm))
        print(tables[-1], end="\n\n", flush=True)
    setups_seconds = time_setups(settings.setups_case, settings.rounds, settings.warmup_rounds)
    tables.append(
        setups_table(
            f"Statistics-driven types and spike skipping: {settings.setups_case.describe()}, CPU float32",
            setups_seconds,
        )
    )
    print(tables[-1], end="\n\n", flush=True)
    for device, dtype in step_runs():
        result = time_optimizer_steps(settings.step_case, device, dtype, settings.step_rounds, 1)
        tables.append(optimizer_step_table(result, targets))
        print(tables[-1], end="\n\n", flush=True)
    for device, _ in step_runs():
        syncs = count_syncs(SYNC_CASE, device, settings.sync_steps)
        title = f"{SYNC_CASE.describe()}, {device.type.upper()} float32"
        tables.append(host_sync_table(title, syncs, device.type))
        print(tables[-1], end="\n\n", flush=True)
    for run in settings.trainer_runs:
        step_times = measure_step_overhead(run.case, run.blocks, run.steps_per_block)
        tables.append(overhead_table(run.case.describe(), step_times, run.case.targets and targets))
        print(tables[-1], end="\n\n", flush=True)
    markdown = results_markdown(machine_description(start_load), tables)
    if output is not None:
        output.write_text(markdown)
        print(f"written to {output}")
    return markdown


if __name__ == "__main__":
    main()
