"""``gradclip-calibrate``: measurements of an unclipped run, recommendations, ready YAML blocks, bad input."""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("composer")

import torch  # noqa: E402
import yaml  # noqa: E402

from gradclip_algo import GradClipAlgo, build_algorithms  # noqa: E402
from gradclip_algo.clipper import GradientClipper  # noqa: E402
from gradclip_algo.train.calibrate import main  # noqa: E402
from gradclip_algo.train.calibration import CalibrationError, Measurements, recommend  # noqa: E402

TYPES = ("norm", "value", "adaptive", "quantile", "zscore", "adagc")
STEPS = 12


def tiny_config(folder: Path, lr: float = 0.05) -> Path:
    config = {
        "run_name": "tiny",
        "run_folder": str(folder / "runs"),
        "max_duration": "1000ba",
        "task": {"sequence_length": 4, "train_samples": 256, "eval_samples": 16, "batch_size": 16},
        "model": {"hidden_size": 4},
        "optimizer": {"name": "sgd", "lr": lr},
        "algorithms": {"gradclip_algo": {"clipping_type": "norm", "clipping_threshold": 1.0}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_csv(path: Path) -> dict[str, list[float]]:
    with path.open() as file:
        rows = list(csv.DictReader(file))
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def rounded(value: float) -> float:
    return float(f"{value:.3g}")


def test_tiny_run_writes_blocks_that_build_and_match_the_recorded_norms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration"
    assert main([str(tiny_config(tmp_path)), "--steps", str(STEPS), "--out", str(out), "seed=3"]) == 0
    printed = capsys.readouterr().out
    assert "algorithms block is set aside" in printed
    recorded = read_csv(out / "grad_norms.csv")
    assert recorded["step"] == list(range(1, STEPS + 1))
    norms = recorded["grad_norm"]
    assert all(0 < m <= n for m, n in zip(recorded["max_abs_grad"], norms, strict=True))
    built = {}
    for clipping_type in TYPES:
        path = out / f"algorithms_{clipping_type}.yaml"
        (algorithm,) = build_algorithms(path)
        assert isinstance(algorithm, GradClipAlgo) and algorithm.clipper.clipping_type == clipping_type
        built[clipping_type] = algorithm.clipper
        assert f"-> {path}" in printed
    assert built["norm"].clipping_threshold == rounded(statistics.mean(norms))
    assert f"mean {statistics.mean(norms):.4g}, std {statistics.stdev(norms):.4g}" in printed
    assert built["value"].clipping_threshold == rounded(statistics.median(recorded["max_abs_grad"]))
    for clipping_type in ("quantile", "zscore", "adagc"):
        assert built[clipping_type].clipping_threshold == rounded(max(norms))
    assert built["quantile"].options.as_dict() == {"percentile": 10.0, "window": 1000}
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_config_and_seed_measure_the_same_norms(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    for name in ("first", "second"):
        assert main([str(config), "--steps", "3", "--out", str(tmp_path / name)]) == 0
    assert read_csv(tmp_path / "first" / "grad_norms.csv") == read_csv(tmp_path / "second" / "grad_norms.csv")


def measurements(norms: list[float], losses: list[float] | None = None) -> Measurements:
    grad_norms = torch.tensor(norms, dtype=torch.float64)
    return Measurements(
        grad_norms=grad_norms,
        max_abs_grads=grad_norms / 4,
        weight_norms=torch.full_like(grad_norms, 2.0),
        unit_ratio_quantiles=torch.linspace(0, 1, 101, dtype=torch.float64).repeat(len(norms), 1),
        losses=None if losses is None else torch.tensor(losses, dtype=torch.float64),
    )


def test_recommendations_follow_their_stated_rules() -> None:
    norms = [1.0, 2.0, 3.0, 4.0, 10.0]
    by_type = {r.clipping_type: r for r in recommend(measurements(norms))}
    assert list(by_type) == list(TYPES)
    assert by_type["norm"].clipping_threshold == 4.0  # the mean
    assert by_type["value"].clipping_threshold == 0.75  # median of the largest |g|: 3 / 4
    assert by_type["adaptive"].clipping_threshold == 0.99  # p99 of ratios spread evenly over [0, 1]
    assert by_type["zscore"].clipping_threshold == 10.0  # the max, as a ceiling
    for recommendation in by_type.values():
        GradientClipper(
            recommendation.clipping_type, recommendation.clipping_threshold, **recommendation.options
        )
    assert by_type["norm"].overrides() == (
        "algorithms.gradclip_algo.clipping_type=norm algorithms.gradclip_algo.clipping_threshold=4.0"
    )


def test_a_diverged_run_recommends_nothing() -> None:
    with pytest.raises(CalibrationError, match=r"diverged: its gradient norm was inf or NaN from step 3 on"):
        recommend(measurements([1.0, 50.0, math.inf, math.nan]))


def test_a_finite_but_exploding_loss_recommends_nothing() -> None:
    norms = [1.0, 3.0, 10.0, 40.0, 200.0, 1e3, 8e3, 5e4, 4e5, 3e6]
    losses = [0.5, 0.6, 1.0, 3.0, 20.0, 90.0, 600.0, 4e3, 3e4, 2e5]
    with pytest.raises(
        CalibrationError,
        match=r"diverged while staying finite: its loss grew 4e\+05-fold, from 0\.5 \(median of steps 1-1\) "
        r"to 2e\+05 \(steps 10-10\), and its gradient norm from 1 to 3e\+06; .*lower optimizer\.lr",
    ):
        recommend(measurements(norms, losses))
    # a loss that falls, or rises less than 100-fold, is a run to calibrate on
    assert recommend(measurements(norms[:5], [0.5, 0.4, 0.3, 0.3, 0.2]))
    assert recommend(measurements(norms[:5], [0.5, 0.6, 1.0, 3.0, 20.0]))


def test_the_demo_at_its_exploding_learning_rate_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo config at lr 0.2 for 20 steps: the norm reaches ~1e17 while finite; nothing is recommended."""
    args = ["demo_unclipped", "--steps", "20", "--out", str(tmp_path / "out"), "task.train_samples=2000"]
    assert main(args) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1
    assert errors[0].startswith("gradclip-calibrate: error: the unclipped run diverged while staying finite")
    assert not (tmp_path / "out").exists()


def test_an_existing_out_folder_is_refused_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration"
    out.mkdir()
    (out / "grad_norms.csv").write_text("mine\n")
    args = [str(tiny_config(tmp_path)), "--steps", "3", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds files; give --force" in err[0]
    assert (out / "grad_norms.csv").read_text() == "mine\n"
    assert main([*args, "--force"]) == 0
    assert read_csv(out / "grad_norms.csv")["step"] == [1.0, 2.0, 3.0]


def test_the_default_folder_gets_a_suffix_instead_of_overwriting(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    for _ in range(2):
        assert main([str(config), "--steps", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny-calibration", "tiny-calibration-2"]


@pytest.mark.parametrize("where", ["--out", "run_folder"])
def test_an_unwritable_folder_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "calibration"  # a folder inside a file: cannot be made, even as root
    extra = ["--out", str(target)] if where == "--out" else [f"run_folder={target}"]
    assert main([str(tiny_config(tmp_path)), "--steps", "3", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradclip-calibrate: error: ") and "cannot create" in err[0]


def test_a_diverging_config_exits_1_with_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration"
    assert main([str(tiny_config(tmp_path, lr=1e30)), "--steps", "4", "--out", str(out)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "diverged" in errors[0] and "lower optimizer.lr" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "1"], r"argument --steps: expected an integer >= 2, got '1'"),
        (["--steps", "ten"], r"argument --steps: expected an integer >= 2, got 'ten'"),
        ([], r"the following arguments are required: --steps"),
        (["--steps", "5", "optimizer.lr=-1"], r"optimizer.lr: expected a number > 0 and finite, got -1"),
        (["--steps", "5", "model.depth=2"], r"model.depth: unknown key; allowed keys in model: hidden_size"),
        (["--steps", "5", "lr"], r"override 'lr': expected key=value"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors exit; the config's return 2
        raise SystemExit(main([str(tiny_config(tmp_path)), *args]))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].startswith("gradclip-calibrate: error: ")
    assert re.search(message, errors[0])
    assert not (tmp_path / "runs").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "absent.yaml"), "--steps", "5"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"gradclip-calibrate: error: {tmp_path / 'absent.yaml'}: no such config file "
        "(shipped configs, by name: demo_clipped, demo_lm, demo_unclipped)"
    )
