"""``gradclip-train``: run folders, metrics and the refusal of bad configs before any training."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("composer")

from omegaconf import OmegaConf  # noqa: E402

from gradclip_algo.train.cli import main  # noqa: E402
from gradclip_algo.train.demo import main as demo_main  # noqa: E402
from gradclip_algo.train.run_config import RunConfigError, load_run_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["max_duration=30ba", "task.train_samples=2000", "task.eval_samples=100", "task.batch_size=32"]


def run(tmp_path: Path, config: str, *overrides: str) -> int:
    return main([str(CONFIGS / config), f"run_folder={tmp_path}", *TINY, *overrides])


def test_run_folder_has_resolved_config_metrics_summary_and_plot(tmp_path: Path) -> None:
    assert run(tmp_path, "demo_clipped.yaml", "algorithms.gradclip_algo.clipping_threshold=0.3") == 0
    folder = tmp_path / "demo_clipped"
    config = OmegaConf.load(folder / "config.yaml")
    assert config.algorithms.gradclip_algo.clipping_threshold == 0.3
    assert config.max_duration == "30ba" and config.model.hidden_size == 32  # defaults filled in
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    for row in rows:
        clipped = row["clipped"] == "True"
        assert clipped == (float(row["grad_norm"]) > 0.3)
        assert float(row["clipped_grad_norm"]) <= (0.3 if clipped else float(row["grad_norm"])) * (1 + 1e-5)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["clipping"] == "norm λ=0.3" and summary["steps"] == 30
    assert summary["clipped_steps"] == sum(r["clipped"] == "True" for r in rows)
    assert (folder / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_gets_a_fresh_folder(tmp_path: Path) -> None:
    assert run(tmp_path, "demo_unclipped.yaml") == 0
    first = (tmp_path / "demo_unclipped" / "metrics.csv").read_text()
    assert run(tmp_path, "demo_unclipped.yaml", "seed=1") == 0
    assert (tmp_path / "demo_unclipped" / "metrics.csv").read_text() == first
    assert (tmp_path / "demo_unclipped-2" / "metrics.csv").exists()


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("missing.yaml", [], "no such config file"),
        ("BROKEN", [], "YAML syntax error at line 3"),
        (
            "demo_clipped.yaml",
            ["nosuchkey=1"],
            "nosuchkey: unknown key; allowed keys in the config: run_name",
        ),
        (
            "demo_clipped.yaml",
            ["optimizer.lr=abc"],
            "optimizer.lr: expected a number > 0 and finite, got 'abc'",
        ),
        ("demo_clipped.yaml", ["optimizer.lr"], "override 'optimizer.lr': expected key=value"),
        ("demo_clipped.yaml", ["max_duration=10"], "max_duration: expected a count > 0 followed by 'ba'"),
        (
            "demo_clipped.yaml",
            ["algorithms.gradclip_algo.clipping_type=l2"],
            "clipping_type: expected one of",
        ),
        ("demo_clipped.yaml", ["algorithms.gradclip_algo.max_norm=1"], "unknown key(s) 'max_norm'"),
        (
            "demo_clipped.yaml",
            ["algorithms.gradclip_algo.log_intervall=5"],
            "'log_intervall' (did you mean 'log_interval'?)",
        ),
        ("demo_clipped.yaml", ["run_folder=/proc/no_such_place"], "cannot create a run folder there"),
        ("FILE-AS-FOLDER", [], "cannot create a run folder there: File exists"),
    ],
)
def test_bad_configs_exit_nonzero_with_one_line_and_train_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], config: str, overrides: list[str], message: str
) -> None:
    if config == "BROKEN":
        broken = tmp_path / "broken.yaml"
        broken.write_text("seed: 0\nrun_name: [unclosed\n")
        config = str(broken)
    runs = tmp_path / "runs"
    if config == "FILE-AS-FOLDER":  # run_folder names a file
        runs.write_text("")
        config = "demo_clipped.yaml"
    code = main([str(CONFIGS / config), f"run_folder={runs}", *overrides])
    err = capfd.readouterr().err
    assert code == 2
    assert err.startswith("gradclip-train: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err
    assert not runs.exists() or runs.is_file()


def test_demo_premise_unclipped_diverges_and_clipped_learns(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The demo's two configs at 150 steps: the unclipped run blows up, the clipped one stays finite."""
    assert demo_main(["--out", str(tmp_path), "--set", "max_duration=150ba"]) == 0  # the shipped configs
    out = capfd.readouterr().out
    unclipped, clipped = (
        json.loads((tmp_path / "demo" / name / "summary.json").read_text())
        for name in ("demo_unclipped", "demo_clipped")
    )
    assert unclipped["first_nonfinite_step"] is not None and unclipped["first_nonfinite_step"] <= 150
    assert clipped["first_nonfinite_step"] is None and clipped["clipped_steps"] > 0
    assert float(clipped["final_loss"]) < 1.0
    assert "| demo_clipped | norm λ=1 |" in out
    assert (tmp_path / "demo" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_checks_every_run_before_making_a_folder(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The optimizer rejects a negative momentum when built, which the demo does for every run up front."""
    configs = [str(CONFIGS / "demo_unclipped.yaml"), str(CONFIGS / "demo_clipped.yaml")]
    code = demo_main([*configs, "--out", str(tmp_path), "--set", "optimizer.options.momentum=-1"])
    err = capfd.readouterr().err
    assert code == 2 and "optimizer.options: sgd rejected {'momentum': -1}" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override", ["algorithms={}", "algorithms=null"])
def test_emptying_the_algorithms_block_turns_clipping_off(tmp_path: Path, override: str) -> None:
    assert run(tmp_path, "demo_clipped.yaml", override) == 0
    summary = json.loads((tmp_path / "demo_clipped" / "summary.json").read_text())
    assert summary["clipping"] == "none" and summary["clipped_steps"] == 0
    assert OmegaConf.load(tmp_path / "demo_clipped" / "config.yaml").algorithms == {}


def test_a_shipped_config_by_name_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo_clipped", "run_folder=out", *TINY]) == 0
    assert (tmp_path / "out" / "demo_clipped" / "metrics.csv").exists()
    assert main(["demo_clipped.yaml", "run_folder=out", *TINY]) == 0
    assert (tmp_path / "out" / "demo_clipped-2" / "metrics.csv").exists()
    assert main(["no_such_config", "run_folder=out"]) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "gradclip-train: error: no_such_config: no such config file "
        "(shipped configs, by name: demo_clipped, demo_lm, demo_unclipped)"
    )


def test_without_a_terminal_progress_is_one_line_every_n_steps(tmp_path: Path) -> None:
    """stderr to a pipe: no progress bar redraws, one line per 10 steps (and none of Composer's bar)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradclip_algo.train.cli",
            "demo_clipped",
            f"run_folder={tmp_path}",
            *TINY,
            "--progress-every",
            "10",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        f"demo_clipped: step {step} of 30ba" for step in (10, 20, 30)
    ]
    assert all(" loss " in line for line in lines)


def test_help_names_every_shipped_config_and_the_language_model() -> None:
    from gradclip_algo.train.calibrate import parser as calibrate_parser
    from gradclip_algo.train.cli import parser as train_parser

    for help_text in (train_parser().format_help(), calibrate_parser().format_help()):
        text = " ".join(help_text.split())
        assert all(name in text for name in ("demo_clipped", "demo_unclipped", "demo_lm", "transformer"))
        assert "Ctrl-C" in text
    assert "vanilla tanh RNN on the adding problem" not in " ".join(train_parser().format_help().split())


def test_algorithms_takes_a_preset_name_or_a_block_file(tmp_path: Path) -> None:
    config = load_run_config(CONFIGS / "demo_unclipped.yaml", ["algorithms=ctrl_norm_0.25"])
    assert config.algorithms == {"gradclip_algo": {"clipping_type": "norm", "clipping_threshold": 0.25}}
    block = tmp_path / "block.yaml"
    block.write_text("algorithms:\n  gradclip_algo: {clipping_type: value, clipping_threshold: 0.5}\n")
    config = load_run_config(CONFIGS / "demo_clipped.yaml", [f"algorithms={block}"])
    assert config.algorithms == {"gradclip_algo": {"clipping_type": "value", "clipping_threshold": 0.5}}
    with pytest.raises(RunConfigError, match=r"^algorithms: ctrl_norm_9: no such file or preset; presets: "):
        load_run_config(CONFIGS / "demo_clipped.yaml", ["algorithms=ctrl_norm_9"])


def test_eval_interval_takes_composer_batch_strings_and_refuses_epochs() -> None:
    config = load_run_config(CONFIGS / "demo_lm.yaml", ["task.eval_interval=10ba"])
    assert config.task.eval_interval == 10
    with pytest.raises(RunConfigError) as err:
        load_run_config(CONFIGS / "demo_lm.yaml", ["task.eval_interval=1ep"])
    assert str(err.value) == (
        "task.eval_interval: only batches are allowed here (it counts optimizer steps): expected an integer "
        ">= 1 or a count of batches such as '10ba', got '1ep'"
    )


def test_a_run_stops_at_its_first_nonfinite_loss_unless_told_to_train_on(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The unclipped demo's loss overflows within 30 steps: the run ends there, its files kept."""
    assert run(tmp_path, "demo_unclipped.yaml", "max_duration=200ba", "task.train_samples=8000") == 0
    out = capfd.readouterr().out
    folder = tmp_path / "demo_unclipped"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    summary = json.loads((folder / "summary.json").read_text())
    last = int(rows[-1]["step"])
    assert last < 30 and not math.isfinite(float(rows[-1]["loss"]))
    assert all(math.isfinite(float(row["loss"])) for row in rows[:-1])
    assert (
        summary["status"] == "nonfinite_loss" and summary["last_step"] == last and not summary["interrupted"]
    )
    assert summary["first_nonfinite_step"] <= last and (folder / "metrics.png").exists()
    assert f"stopped at step {last}: the loss is inf or NaN (stop_on_nonfinite_loss=false trains on)" in out
    assert run(tmp_path, "demo_unclipped.yaml", "max_duration=40ba", "stop_on_nonfinite_loss=false") == 0
    summary = json.loads((tmp_path / "demo_unclipped-2" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["last_step"] == summary["steps"] == 40


def test_the_comparison_plot_shows_the_cap_and_a_run_that_stopped_early() -> None:
    """The norm after clipping is drawn over the norm before it in another shade, and a run that stopped
    at step 25 of 2000 gets a logarithmic step axis instead of a sliver at x = 0."""
    from gradclip_algo.train.metrics import StepRecord
    from gradclip_algo.train.plot import PlotSeries, draw_runs

    stopped = [StepRecord(step, 1.0 + step, 8.0 * step, 8.0 * step, False) for step in range(1, 25)]
    stopped.append(StepRecord(25, math.inf, math.inf, math.inf, False))
    clipped = [StepRecord(step, 0.1, 2.0, 1.0, True) for step in range(1, 2001)]
    figure = draw_runs([PlotSeries("unclipped", stopped, None), PlotSeries("clipped", clipped, 1.0)], "t")
    norm_axis = figure.axes[1]
    lines = {line.get_label(): line for line in norm_axis.get_lines()}
    before, after = lines["clipped: before clipping"], lines["clipped: after clipping"]
    assert before.get_color() != after.get_color() and after.get_zorder() > before.get_zorder()
    assert lines["threshold λ = 1"].get_color() == after.get_color()
    assert norm_axis.get_xscale() == "log"
    alone = draw_runs([PlotSeries("clipped", clipped, 1.0)], "t")
    assert alone.axes[1].get_xscale() == "linear"
