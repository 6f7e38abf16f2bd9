"""The benchmark's code paths on tiny sizes: its cases, its agreement check, and every row of its tables."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.composer
pytest.importorskip("composer")
pytest.importorskip("timm")

from benchmarks import implementations  # noqa: E402
from benchmarks.bench_clipping import SMOKE, main  # noqa: E402
from benchmarks.cases import (  # noqa: E402
    GPT2_SMALL,
    MANY_SMALL,
    SMOKE_CASES,
    clipping_thresholds,
    grad_restorer,
    make_model,
)
from benchmarks.clipper_setups import SETUPS  # noqa: E402
from benchmarks.host_syncs import SYNC_CASES  # noqa: E402
from benchmarks.implementations import (  # noqa: E402
    FLOOR,
    IMPLEMENTATIONS,
    REFERENCE,
    Implementation,
    deviations_from_reference,
)
from benchmarks.optimizer_step import FOLDED_CASES, folding_supported, step_cases  # noqa: E402

CPU = torch.device("cpu")


def test_full_cases_have_the_documented_sizes() -> None:
    assert len(GPT2_SMALL.shapes) == 148
    assert GPT2_SMALL.numel == 124_439_808
    assert GPT2_SMALL.shapes[:2] == ((50257, 768), (1024, 768))
    assert len(MANY_SMALL.shapes) == 5000 and MANY_SMALL.numel == 5000 * 32 * 32


@pytest.mark.parametrize("case", SMOKE_CASES, ids=lambda case: case.name)
def test_every_implementation_clips_like_the_reference(case) -> None:
    model = make_model(case, CPU, torch.float32)
    grads = [param.grad for param in model.parameters()]
    initial = [grad.clone() for grad in grads]
    reset = grad_restorer(model)
    thresholds = clipping_thresholds(model)
    for clipping_type, implementations_of_type in IMPLEMENTATIONS.items():
        reset()
        reference = next(impl for impl in implementations_of_type if impl.label == REFERENCE[clipping_type])
        reference.clip(model, thresholds[clipping_type])
        expected = [grad.clone() for grad in grads]
        assert any(not torch.equal(e, i) for e, i in zip(expected, initial, strict=True)), clipping_type
        for implementation in implementations_of_type:
            reset()
            implementation.clip(model, thresholds[clipping_type])
            for got, want in zip(grads, expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_agreement_check_flags_an_implementation_that_clips_differently(monkeypatch) -> None:
    model = make_model(SMOKE_CASES[0], CPU, torch.float32)
    reset = grad_restorer(model)
    thresholds = clipping_thresholds(model)
    deviations = deviations_from_reference(model, reset, thresholds)
    assert set(deviations) == {(t, impl.label) for t, impls in IMPLEMENTATIONS.items() for impl in impls}
    assert max(deviations.values()) < 1e-6

    # a norm rule off by 1 % must show as a deviation of about 1 %
    wrong = Implementation("wrong", lambda m, t: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.99 * t))
    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "norm", (*IMPLEMENTATIONS["norm"], wrong))
    deviations = deviations_from_reference(model, reset, thresholds)
    assert deviations[("norm", "wrong")] == pytest.approx(0.01, rel=1e-3)


def test_smoke_run_writes_every_row(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    markdown = main(["--smoke", "--output", str(output)])
    assert output.read_text() == markdown
    sections = markdown.split("\n### ")
    for case in SMOKE_CASES:
        section = next(s for s in sections if s.startswith(case.name))
        rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")][2:]
        labels = [(row[0].removeprefix("| "), row[1]) for row in rows]
        expected = [
            label
            for clipping_type, impls in IMPLEMENTATIONS.items()
            for label in [*((clipping_type, impl.label) for impl in impls), (clipping_type, FLOOR)]
        ]
        assert [(t, label.split(" (")[0]) for t, label in labels] == expected
        for row in rows:
            median_ms, ratio = float(row[2]), float(row[4])
            assert median_ms >= 0 and ratio > 0
        assert "norm λ =" in section and "value λ = 0.001" in section and "adaptive λ = 0.01" in section
    setups_section = next(s for s in sections if s.startswith("Statistics-driven types and spike skipping"))
    for setup in SETUPS:
        assert f"| {setup.label} |" in setups_section
    step_section = next(s for s in sections if s.startswith("Clipping + fused AdamW step: GPT-2 tiny"))
    step_labels = [case.label for case in step_cases(folding_supported())]
    assert _first_column(step_section) == step_labels
    assert "Ours folded added ÷ torch added" in step_section or "The folded cases are missing" in step_section
    sync_section = next(s for s in sections if s.startswith("Host syncs per clip + step"))
    assert _first_column(sync_section) == [*step_labels, *(case.label for case in SYNC_CASES)]
    syncs = dict(zip(_first_column(sync_section), _column(sync_section, 1), strict=True))
    assert all(syncs[label] == "0" for label in FOLDED_CASES if label in syncs)
    assert syncs[SYNC_CASES[0].label] == "1"  # unfolded spike skipping reads its decision once
    trainer_sections = [s for s in sections if s.startswith("Composer training step")]
    assert len(trainer_sections) == len(SMOKE.trainer_runs)
    for run, section in zip(SMOKE.trainer_runs, trainer_sections, strict=True):
        assert section.startswith(f"Composer training step: {run.case.describe()}")
        labels = [label.removesuffix(", folded") for label in _first_column(section)]
        assert labels == [c.label for c in run.case.configurations]
    embedding_section = trainer_sections[1]
    # under fused AdamW, alone at AFTER_TRAIN_BATCH in its block, the default norm clip folds
    assert "| gradclip_algo GradClipAlgo('norm', 1.0), folded |" in embedding_section
    for clipping_type in ("norm", "value", "adaptive"):
        assert f"{clipping_type} **" in embedding_section.split("GradClipAlgo overhead ÷ Composer")[1]
    assert "torch 2." in markdown and "torch threads" in markdown
    assert "target" not in markdown.replace("no target applies", "")  # smoke figures mean nothing
    assert "**Smoke run**" in markdown and "as timings they mean nothing" in markdown


def _column(section: str, index: int) -> list[str]:
    """Cell ``index`` of every body row of the first table in ``section``."""
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")][2:]
    return [row[index].removeprefix("| ").removesuffix(" |") for row in rows]


def _first_column(section: str) -> list[str]:
    return _column(section, 0)


def test_gpu_check_without_cuda_says_so_in_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: make gpu-check runs for real")
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr


def test_gpu_check_tables_run_on_the_cpu_with_a_tiny_case(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    namespace = runpy.run_path(str(script), run_name="gpu_check")
    output = tmp_path / "RESULTS-gpu.md"
    markdown = namespace["run_benchmark"](1, output, device="cpu", case_name=SMOKE_CASES[0].name)
    assert output.read_text() == markdown and "make gpu-check" in markdown
    for title in ("GPT-2 tiny", "Clipping + fused AdamW step: GPT-2 tiny", "Host syncs per clip + step"):
        assert f"\n### {title}" in markdown
