"""What the compiled kernels cost before they pay: the first call's compile time, and their recompiles.

Each measurement runs in a fresh Python process (``python -m benchmarks.compile_time CASE``) that clips
the grads of a case with each clipping type: the first call (it imports the compiler and compiles the
kernels of the type), a second call, then calls on the grads of other sizes (a case with other shapes).
It prints the seconds of each and the graphs torch compiled after each stage
(``torch._dynamo.utils.counters['stats']['unique_graphs']``): a recompile for new sizes would add graphs.
The cold run gets an empty Inductor cache (a new ``TORCHINDUCTOR_CACHE_DIR``); the warm run, a second
process, finds the first one's cache on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks.cases import (
    FULL_CASES,
    GPT2_BLOCKS,
    SMOKE_BLOCKS,
    SMOKE_CASES,
    Case,
    clipping_thresholds,
    make_model,
)
from gradclip_algo import apply_gradient_clipping

CASES = {case.name: case for case in (*FULL_CASES, *SMOKE_CASES, GPT2_BLOCKS, SMOKE_BLOCKS)}
OTHER_SIZES = {
    case.name: other for case, other in [(FULL_CASES[0], GPT2_BLOCKS), (SMOKE_CASES[0], SMOKE_BLOCKS)]
}
"""The case whose sizes each case's kernels meet second: no recompile may follow."""
LATER_CALLS = 3
TYPES = ("norm", "value", "adaptive")


@dataclass(frozen=True)
class Compilation:
    """One clipping type in one fresh process: seconds of the first and second calls, and graphs compiled
    after the first call, after the second and after ``LATER_CALLS`` calls on other sizes."""

    clipping_type: str
    first_s: float
    second_s: float
    graphs: tuple[int, int, int]

    @property
    def recompiles(self) -> int:
        return self.graphs[2] - self.graphs[0]


def compiled_graphs() -> int:
    """The graphs torch.compile has compiled in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(case: Case) -> list[dict[str, object]]:
    """In this process: every type's first and second call on ``case``, then calls on other sizes."""
    torch.set_num_threads(2)
    model = make_model(case, torch.device("cpu"), torch.float32)
    other = make_model(OTHER_SIZES[case.name], torch.device("cpu"), torch.float32)
    thresholds, other_thresholds = clipping_thresholds(model), clipping_thresholds(other)
    results = []
    for clipping_type in TYPES:
        clip = partial(apply_gradient_clipping, model, clipping_type, thresholds[clipping_type])
        first = _timed(clip)
        after_first = compiled_graphs()
        second = _timed(clip)
        after_second = compiled_graphs()
        for _ in range(LATER_CALLS):
            apply_gradient_clipping(other, clipping_type, other_thresholds[clipping_type])
        results.append(
            {
                "clipping_type": clipping_type,
                "first_s": first,
                "second_s": second,
                "graphs": [after_first, after_second, compiled_graphs()],
            }
        )
    return results


def compile_times(case: Case) -> tuple[list[Compilation], list[Compilation]]:
    """The cold and the warm run (two fresh processes sharing one new Inductor cache directory)."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for _ in ("cold", "warm"):
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.compile_time", case.name],
                cwd=Path(__file__).resolve().parent.parent,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            lines = [line for line in output.splitlines() if line.startswith("[")]
            runs.append(
                [
                    Compilation(r["clipping_type"], r["first_s"], r["second_s"], tuple(r["graphs"]))
                    for r in json.loads(lines[-1])
                ]
            )
    return runs[0], runs[1]


if __name__ == "__main__":
    print(json.dumps(measure(CASES[sys.argv[1]])))
