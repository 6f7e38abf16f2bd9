"""A task for the pool interruption test: it notes that it started, then waits for a stop request as a
training run does between steps (torch-free beyond the package's import, so the workers start fast)."""

from __future__ import annotations

import time
from pathlib import Path

from gradclip_algo.train.interrupt import Interrupted, requested

WAIT_S = 60.0


def wait_for_stop(item: tuple[Path, int]) -> int:
    """Write ``started-<index>`` into the folder, then raise :class:`Interrupted` at the first stop request
    (polling every 10 ms, as a run checks after each step); return the index if none comes in WAIT_S."""
    folder, index = item
    (folder / f"started-{index}").touch()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        signum = requested()
        if signum is not None:
            raise Interrupted(signum, (f"task {index} stopped",))
        time.sleep(0.01)
    return index
