"""Ctrl-C and SIGTERM: a run stops after its current step with its files written and marked, queued runs
never start, and ``gradclip-calibrate`` leaves no folder behind. Real signals to real processes."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gradclip_algo.train.interrupt import Interrupted
from gradclip_algo.train.pool import run_all

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0  # a process importing torch and Composer on a busy 2-core machine
STOP_TIMEOUT_S = 30.0  # the stop itself takes a step; the rest is the interpreter's exit
INTERRUPTED_TASKS = 2


def _wait_for(condition, timeout: float, process: subprocess.Popen[str] | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended before it was signalled: {process.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the process to start its run")
        time.sleep(0.02)


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open())) if path.exists() else []


@pytest.mark.composer
def test_ctrl_c_stops_a_training_run_with_its_files_marked(tmp_path: Path) -> None:
    """SIGINT to the process group, as a terminal sends it, once the first step is written."""
    pytest.importorskip("composer")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradclip_algo.train.cli",
            "demo_clipped",
            f"run_folder={tmp_path}",
            "max_duration=100000ba",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    folder = tmp_path / "demo_clipped"
    try:
        _wait_for(lambda: len(_rows(folder / "metrics.csv")) >= 1, START_TIMEOUT_S, process)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGINT, err
    rows = _rows(folder / "metrics.csv")
    last = int(rows[-1]["step"])
    assert [int(row["step"]) for row in rows] == list(range(1, last + 1)) and last < 100000
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["status"] == "interrupted"
    assert summary["last_step"] == summary["steps"] == last
    assert not (folder / "metrics.png").exists()  # not drawn: the stop does not wait for a plot
    assert err.strip().splitlines()[-1] == (
        f"gradclip-train: interrupted by SIGINT: {folder} holds steps 1-{last}, marked "
        '"interrupted": true in summary.json'
    )


@pytest.mark.composer
def test_sigterm_stops_calibration_and_leaves_no_folder(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM to this process once the calibration folder exists: the exit status and one line."""
    pytest.importorskip("composer")
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    from gradclip_algo.train.calibrate import main as calibrate

    folder = tmp_path / "demo_clipped-calibration"

    def signal_once_made() -> None:
        _wait_for(folder.exists, START_TIMEOUT_S)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=signal_once_made, daemon=True)
    sender.start()
    code = calibrate(["demo_clipped", "--steps", "100000", f"run_folder={tmp_path}", "optimizer.lr=0.05"])
    sender.join(timeout=1)
    assert code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradclip-calibrate: interrupted by SIGTERM after ")
    assert err[0].endswith(
        f"unclipped steps: nothing written; the folder made for its files, {folder}, is removed"
    )


def test_ctrl_c_cancels_queued_pool_work(tmp_path: Path) -> None:
    """Six tasks on two workers, SIGINT to the parent and both workers (as a terminal sends it) once two
    have started: those two stop and report, the four queued ones never start."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    from interrupt_tasks import wait_for_stop

    def interrupt_once_started() -> None:
        _wait_for(lambda: len(list(tmp_path.glob("started-*"))) == INTERRUPTED_TASKS, START_TIMEOUT_S)
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    sender = threading.Thread(target=interrupt_once_started, daemon=True)
    sender.start()
    with pytest.raises(Interrupted) as stop:
        run_all(wait_for_stop, [(tmp_path, index) for index in range(6)], jobs=INTERRUPTED_TASKS)
    sender.join(timeout=1)
    assert stop.value.exit_status == 130
    assert sorted(stop.value.messages) == ["task 0 stopped", "task 1 stopped"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["started-0", "started-1"]
    assert signal.getsignal(signal.SIGINT) is handler  # put back
