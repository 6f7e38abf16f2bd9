"""Running the app's runs in worker processes, stoppable by SIGINT or SIGTERM (see
:mod:`gradclip_algo.train.interrupt`).

:func:`run_all` keeps at most ``jobs`` runs submitted at a time, so no run waits queued where a stop could
not reach it. On a stop request (a signal to the parent, or to the whole process group as a terminal's
Ctrl-C sends) it starts nothing more, lets the running runs stop at their next step boundary and write their
files, and raises one :class:`~gradclip_algo.train.interrupt.Interrupted` with their lines.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TypeVar

from gradclip_algo.train.interrupt import (
    Interrupted,
    init_worker,
    raise_if_requested,
    requested,
    share_with_workers,
    stop_signals,
)

Item = TypeVar("Item")
Result = TypeVar("Result")
POLL_S = 0.1
"""How often the parent looks for a stop request while runs are going."""


def run_all(fn: Callable[[Item], Result], items: Sequence[Item], jobs: int) -> list[Result]:
    """``[fn(item) for item in items]``, in ``jobs`` spawned worker processes (in this process for 1).

    ``fn`` must be a module-level function. Raises :class:`Interrupted` after a stop request, once every
    started run has ended; its messages are those of the runs' own ``Interrupted``.
    """
    if jobs <= 1:
        results = []
        with stop_signals():
            for item in items:
                raise_if_requested()
                results.append(fn(item))
        return results
    context = multiprocessing.get_context("spawn")
    shared = context.Value("i", 0)
    with stop_signals():
        pool = ProcessPoolExecutor(
            jobs, mp_context=context, initializer=init_worker, initargs=(shared, fn.__module__)
        )
        share_with_workers(shared)
        wait_for_workers = True
        try:
            return _run(pool, fn, items, jobs)
        except Interrupted:
            wait_for_workers = False  # every run has ended and written its files: report without waiting
            raise  # for the worker processes to exit (they do in the background; the interpreter waits)
        finally:
            share_with_workers(None)
            pool.shutdown(wait=wait_for_workers, cancel_futures=True)


def _run(
    pool: ProcessPoolExecutor, fn: Callable[[Item], Result], items: Sequence[Item], jobs: int
) -> list[Result]:
    """Submit ``jobs`` at a time until a stop request; then wait for the running ones and raise."""
    futures: list[Future[Result]] = []
    running: set[Future[Result]] = set()
    while True:
        while requested() is None and len(futures) < len(items) and len(running) < jobs:
            futures.append(pool.submit(fn, items[len(futures)]))
            running.add(futures[-1])
        if not running:
            break
        done, running = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
        for future in done:
            error = future.exception()
            if error is not None and not isinstance(error, Interrupted) and requested() is None:
                raise error  # after a stop request, a worker that died of the signal is part of the stop
    signum = requested()
    if signum is not None:
        errors = [future.exception() for future in futures]
        raise Interrupted(
            signum, tuple(line for e in errors if isinstance(e, Interrupted) for line in e.messages)
        )
    return [future.result() for future in futures]
