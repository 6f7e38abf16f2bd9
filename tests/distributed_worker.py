"""Two CPU ranks (gloo) run the cases of tests/test_distributed.py, all in one start of the ranks (four
ranks for the 2x2 meshes). The ranks are forked from one server process that has imported torch and the
cases once (:func:`start_forkserver`).

Each case builds a model, wraps it (DDP, FSDP1 with and without ``use_orig_params``, FSDP2, TP, pipeline
stages, 2-D meshes), trains it on its rank's part of a global batch and checks the result against a
single-process reference that sees the whole batch. Cases do their collectives first and their local
asserts last, so a failing assert leaves the ranks in step for the next case. :func:`start_cases` starts them; :meth:`Spawn.results` returns,
per case, each rank's traceback or ``None``.

The cases, by feature (each module registers its cases in ``distributed_common.CASES``):

- tests/distributed_cases_rules.py: 'norm', 'value', 'adaptive' on DDP, FSDP1 and FSDP2, rank and shard
  corner cases, bf16;
- tests/distributed_cases_nonfinite.py: inf/NaN on one rank with 'skip', 'error' and 'zero';
- tests/distributed_cases_layouts.py: every clipping type (stateful rules and spike skipping included) and
  every non-finite mode on every parallel set-up (DDP, FSDP1, FSDP2, TP, pipeline, 2x2 meshes);
- tests/distributed_cases_composer.py: the same through Composer's ``Trainer`` and ``Engine`` (imported
  by the ranks only where Composer is installed).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from unittest import mock

import distributed_cases_layouts
import distributed_cases_nonfinite
import distributed_cases_rules
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_common import CASES, FOUR_RANKS, LIMITS, WORLD_SIZE

__all__ = ["CASES", "FOUR_RANKS", "LIMITS", "WORLD_SIZE", "Spawn", "start_cases"]
CASE_MODULES = (distributed_cases_rules, distributed_cases_nonfinite, distributed_cases_layouts)
"""The modules whose cases every rank runs (importing them registers their cases, in this order)."""

# ---- running the cases ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


COLLECTIVE_TIMEOUT = timedelta(seconds=30)


def _start_group(store: dist.Store, generation: str, rank: int, world_size: int) -> None:
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(generation, store),
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def _rank_main(
    rank: int, port: int, names: list[str], out_dir: str, extra_cases: str | None, world_size: int
) -> None:
    """Run every case on this rank. After a case that failed on any rank (a rank may have left the others
    waiting in a collective until it timed out), all ranks start a fresh process group, so one failure does
    not spoil the cases after it. The ranks tell each other how a case went through the store."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    if extra_cases is not None:
        __import__(extra_cases)  # registers its cases in CASES
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=3 * COLLECTIVE_TIMEOUT)
    _start_group(store, "start", rank, world_size)
    outcomes: dict[str, str | None] = {}
    for name in names:
        try:
            CASES[name](rank)
            outcomes[name] = None
        except Exception:
            outcomes[name] = traceback.format_exc()
        store.set(f"{name}/{rank}", "passed" if outcomes[name] is None else "failed")
        if any(store.get(f"{name}/{other}") == b"failed" for other in range(world_size)):
            dist.destroy_process_group()
            _start_group(store, f"after {name}", rank, world_size)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.barrier()  # rank 0 serves the store: it leaves only once every rank has read the last outcomes
    dist.destroy_process_group()


def start_forkserver(preload: list[str]) -> None:
    """Start the server process that forks the ranks, once it has imported ``preload`` (torch and the
    cases): each rank then starts in milliseconds instead of importing them again for seconds of CPU. The
    server is fresh and single-threaded, so forking it is safe. Python 3.11's server ignores the caller's
    ``sys.path``, so it gets it as ``PYTHONPATH`` while it starts. Once it runs, this does nothing."""
    multiprocessing.set_forkserver_preload(preload)
    with mock.patch.dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)):
        multiprocessing.forkserver.ensure_running()


class Spawn:
    """Ranks started by :func:`start_cases`, running while the caller does other work."""

    def __init__(self, names: list[str], extra_cases: str | None, world_size: int, timeout: float) -> None:
        self.names = names
        self.world_size = world_size
        self.out_dir = tempfile.TemporaryDirectory()
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        start_forkserver([__name__, *([extra_cases] if extra_cases else [])])
        self.context = mp.start_processes(
            _rank_main,
            (free_port(), names, self.out_dir.name, extra_cases, world_size),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )

    def results(self) -> dict[str, list[str | None]]:
        """Wait for the ranks; per case, each rank's traceback (``None`` where it passed)."""
        with self.out_dir as out_dir:
            while not self.context.join(timeout=max(self.deadline - time.monotonic(), 0.0)):
                if time.monotonic() >= self.deadline:
                    for process in self.context.processes:
                        process.kill()
                    raise TimeoutError(f"the ranks did not finish within {self.timeout:.0f} s")
            found = [
                json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(self.world_size)
            ]
        return {name: [result[name] for result in found] for name in self.names}


def start_cases(
    names: list[str], extra_cases: str | None = None, timeout: float = 600.0, world_size: int = WORLD_SIZE
) -> Spawn:
    """Start ``names`` on ``world_size`` spawned ranks and return at once; :meth:`Spawn.results` waits.

    ``extra_cases`` names a module that each rank imports first to register more cases.
    """
    return Spawn(names, extra_cases, world_size, timeout)
