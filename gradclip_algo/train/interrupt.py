"""Stopping the app's runs on SIGINT (Ctrl-C) and SIGTERM at a step boundary, with their files written.

While :func:`stop_signals` is active, the first SIGINT or SIGTERM only records a request: a run checks
:func:`requested` after each optimizer step, writes what it has, marks it as interrupted and raises
:class:`Interrupted`. A second signal raises ``KeyboardInterrupt`` at once. A process that ignores the
signals (``SIG_IGN``, as ``nohup`` sets up) keeps ignoring them.

Worker processes (:mod:`gradclip_algo.train.pool`) share the request through a shared integer, so a signal
that reaches only the parent (``kill PID``) stops their runs as well. Needs neither Composer nor
omegaconf.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SharedInt(Protocol):
    """A ``multiprocessing.Value('i')``: an integer that every process of a pool sees."""

    value: int


class Interrupted(KeyboardInterrupt):
    """Runs stopped by a signal, after writing their files. ``messages``: one line per run that had
    written something (naming its folder and its last step); ``exit_status``: ``128 + signum``."""

    def __init__(self, signum: int, messages: tuple[str, ...] = ()) -> None:
        super().__init__(signum, messages)
        self.signum = signum
        self.messages = messages

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return "; ".join(self.messages) or f"interrupted by {signal_name(self.signum)}"


_requested: int | None = None
_shared: SharedInt | None = None
_depth = 0


def signal_name(signum: int) -> str:
    """``'SIGINT'`` for 2, ``'SIGTERM'`` for 15."""
    return signal.Signals(signum).name


def requested() -> int | None:
    """The signal that asked the runs of this process (or of its pool) to stop, else ``None``."""
    if _requested is not None:
        return _requested
    if _shared is not None and _shared.value:
        return _shared.value
    return None


def _on_signal(signum: int, frame: Any) -> None:
    """The first signal to this process asks to stop at the next step boundary; a second one stops at once
    (a request shared by the pool's parent does not count: a terminal's Ctrl-C reaches both)."""
    global _requested
    if _requested is not None:
        raise KeyboardInterrupt
    _requested = signum
    if _shared is not None:
        _shared.value = signum


def _install() -> dict[int, Any]:
    """Our handler for every stop signal not ignored; returns the handlers it replaced."""
    previous = {}
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _on_signal)
    return previous


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as stop requests while inside (in the main thread). Nested uses share one
    request; leaving the outermost one puts the previous handlers back and forgets the request, so code
    that runs several runs in a row keeps one use around them all (each run checks
    :func:`raise_if_requested` before it starts)."""
    global _depth, _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _install() if _depth == 0 else {}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _requested = None


def raise_if_requested() -> None:
    """:class:`Interrupted`, with no message, where a stop was requested before a run wrote anything."""
    signum = requested()
    if signum is not None:
        raise Interrupted(signum)


def share_with_workers(shared: SharedInt | None) -> None:
    """Make ``shared`` this process's stop request too (``None``: stop sharing); in a pool's parent, so
    that its signals reach the workers' runs."""
    global _shared
    _shared = shared


def init_worker(shared: SharedInt, task_module: str) -> None:
    """A pool worker's initializer: share the parent's stop request and handle the stop signals for the
    worker's lifetime. ``task_module`` (the task function's module) is imported first, so that a handler it
    installs on import (Composer installs one that exits the process) does not replace ours."""
    global _depth
    __import__(task_module)
    share_with_workers(shared)
    _install()
    _depth = 1  # for good: the worker's runs nest inside


def report(prog: str, stop: Interrupted) -> int:
    """One line per interrupted run on stderr (a generic one where none had written anything); returns the
    exit status, 128 + the signal's number."""
    for line in stop.messages or (str(stop),):
        print(f"{prog}: {line}", file=sys.stderr, flush=True)
    return stop.exit_status


def exit_status(prog: str, main: Callable[[Sequence[str] | None], int]) -> int:
    """``main(None)``'s exit status; an :class:`Interrupted` is reported (:func:`report`) instead of raised."""
    try:
        return main(None)
    except Interrupted as stop:
        return report(prog, stop)
