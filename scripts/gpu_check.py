"""``make gpu-check``: the CUDA tests, then the benchmark's CUDA tables, on one GPU in a few minutes.

1. ``pytest -m cuda``: every test marked ``cuda`` (``tests/test_cuda.py``: a Composer ``Trainer`` with
   ``GradClipAlgo('norm', 1.0)`` under ``amp_bf16`` and ``amp_fp16``, no host sync when folded with
   ``skip_spikes`` under ``torch.cuda.set_sync_debug_mode('error')``, folded equals unfolded with fused
   AdamW; ``tests/test_compiled_kernels.py``: the compiled (Triton) kernels equal the eager ones without a
   host sync; and the CUDA cases of the other test files).
2. A bounded subset of ``make bench`` on the GPU: the clipping implementations on GPT-2 small in fp32 and
   bf16 (ours with the compiled kernels and with the eager ones), clipping + fused AdamW step on GPT-2
   small, host syncs per step; written to ``benchmarks/RESULTS-gpu.md`` (or ``--output``).

Both run with the compiled kernels on for CUDA (``GRADCLIP_ALGO_COMPILE=cuda``; by default they run on
CPU only), so that the tables show whether they win there.

Without CUDA it prints one line and exits with status 2. Exit status 1 when a test fails.
Usage: ``python scripts/gpu_check.py [--rounds N] [--output PATH] [--skip-tests] [--skip-bench]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gradclip_algo import set_compiled_kernels  # noqa: E402

NO_CUDA = 2


def run_tests() -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO, check=False).returncode


def run_benchmark(rounds: int, output: Path, device: str = "cuda", case_name: str = "GPT-2 small") -> str:
    """The tables on ``device`` (the tests run them on the CPU with a tiny case); returns the markdown."""
    from benchmarks.bench_clipping import SYNC_CASE, Settings, benchmark_case
    from benchmarks.cases import FULL_CASES, GPT2_BLOCKS, SMOKE_CASES
    from benchmarks.host_syncs import count_syncs
    from benchmarks.optimizer_step import time_optimizer_steps
    from benchmarks.report import (
        case_table,
        host_sync_table,
        machine_description,
        optimizer_step_table,
        results_markdown,
    )

    cuda = torch.device(device)
    case = next(case for case in (*FULL_CASES, *SMOKE_CASES) if case.name == case_name)
    settings = Settings(
        (case,),
        GPT2_BLOCKS,
        rounds=rounds,
        warmup_rounds=1,
        step_case=case,
        step_rounds=rounds,
        sync_steps=5,
        trainer_runs=(),
    )
    tables = []
    for dtype in (torch.float32, torch.bfloat16):
        tables.append(case_table(benchmark_case(case, cuda, dtype, settings)))
        print(tables[-1], end="\n\n", flush=True)
    tables.append(optimizer_step_table(time_optimizer_steps(case, cuda, torch.float32, rounds, 1)))
    print(tables[-1], end="\n\n", flush=True)
    title = f"{SYNC_CASE.describe()}, {cuda.type.upper()} float32"
    tables.append(host_sync_table(title, count_syncs(SYNC_CASE, cuda, settings.sync_steps), cuda.type))
    print(tables[-1], end="\n\n", flush=True)
    markdown = results_markdown(
        machine_description(), tables, "`make gpu-check` (the CUDA tables of `make bench`, bounded)"
    )
    output.write_text(markdown)
    print(f"written to {output}")
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per table (default 20)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "RESULTS-gpu.md")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing was run", file=sys.stderr
        )
        return NO_CUDA
    os.environ["GRADCLIP_ALGO_COMPILE"] = "cuda"  # the tests' processes; this one:
    set_compiled_kernels(True, cuda=True)
    start = time.perf_counter()
    status = 0 if args.skip_tests else run_tests()
    print(f"tests: exit status {status}, {time.perf_counter() - start:.0f} s", flush=True)
    if not args.skip_bench:
        bench_start = time.perf_counter()
        run_benchmark(args.rounds, args.output)
        print(f"benchmark: {time.perf_counter() - bench_start:.0f} s", flush=True)
    print(f"gpu-check: {'passed' if status == 0 else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
