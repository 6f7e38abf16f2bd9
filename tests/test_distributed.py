"""DDP, FSDP1, FSDP2, TP, pipeline stages on 2 CPU ranks (gloo), and FSDP2 + TP, HSDP and pipeline x FSDP2
on 2x2 meshes on 4 ranks, each against a single-process reference.

The 2-rank cases run in one spawn of 2 ranks, the 4-rank ones in one spawn of 4, both at once
(tests/distributed_worker.py);
each test reports one case's outcome on every rank. The cases are grouped by feature:
tests/distributed_cases_rules.py, tests/distributed_cases_nonfinite.py, tests/distributed_cases_layouts.py
and tests/distributed_cases_composer.py (shared helpers in tests/distributed_common.py).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from distributed_worker import CASES, FOUR_RANKS, LIMITS, Spawn, start_cases

from gradclip_algo import GradientClipper, apply_gradient_clipping

COMPOSER_MODULE = "distributed_cases_composer"
if importlib.util.find_spec("composer") is not None:
    from distributed_cases_composer import COMPOSER_CASES
else:
    COMPOSER_CASES = {}
TORCH_CASES = [case for case in CASES if case not in COMPOSER_CASES and case not in FOUR_RANKS]


def selected_cases(request: pytest.FixtureRequest, world: set[str] | None) -> list[str]:
    """The selected cases (only those) of one world size (``None``: 2 ranks), less those torch blocks."""
    specs = [
        getattr(item, "callspec", None) for item in request.session.items if item.module is request.module
    ]
    # an empty parametrisation (no Composer) leaves a placeholder that is not a case name
    names = [spec.params["case"] for spec in specs if spec and isinstance(spec.params.get("case"), str)]
    return [
        name
        for name in names
        if name not in LIMITS and ((name in FOUR_RANKS) if world is not None else name not in FOUR_RANKS)
    ]


@pytest.fixture(scope="module")
def spawns(request: pytest.FixtureRequest) -> dict[int, Spawn]:
    """The selected 2-rank cases and the selected 4-rank ones (2x2 meshes), each world in one spawn, both
    started at once: the ranks spend most of their time waiting in collectives."""
    two, four = selected_cases(request, None), selected_cases(request, FOUR_RANKS)
    extra = COMPOSER_MODULE if COMPOSER_CASES else None
    started = {2: start_cases(two, extra)} if two else {}
    if four:
        started[4] = start_cases(four, world_size=4)
    return started


@pytest.fixture(scope="module")
def outcomes(spawns: dict[int, Spawn]) -> dict[str, list[str | None]]:
    """The outcomes of the 2-rank cases."""
    return spawns[2].results() if 2 in spawns else {}


@pytest.fixture(scope="module")
def outcomes_on_four(spawns: dict[int, Spawn]) -> dict[str, list[str | None]]:
    """The outcomes of the 4-rank cases."""
    return spawns[4].results() if 4 in spawns else {}


def assert_passed_on_every_rank(outcomes: dict[str, list[str | None]], case: str) -> None:
    failures = [f"rank {rank}:\n{error}" for rank, error in enumerate(outcomes[case]) if error is not None]
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.mark.parametrize("case", TORCH_CASES)
def test_two_ranks(outcomes: dict[str, list[str | None]], case: str) -> None:
    assert_passed_on_every_rank(outcomes, case)


@pytest.mark.parametrize("case", sorted(FOUR_RANKS))
def test_four_ranks(case: str, request: pytest.FixtureRequest) -> None:
    if case in LIMITS:
        pytest.skip(LIMITS[case])
    assert_passed_on_every_rank(request.getfixturevalue("outcomes_on_four"), case)


@pytest.mark.composer
@pytest.mark.parametrize("case", list(COMPOSER_CASES))
def test_two_ranks_through_composer(outcomes: dict[str, list[str | None]], case: str) -> None:
    assert_passed_on_every_rank(outcomes, case)


def test_inf_norm_of_an_empty_shard() -> None:
    """An FSDP2 rank holds an empty shard of any parameter with fewer rows than ranks (a (1, n) weight, a
    bias of size 1 on 2 ranks); its max-abs contributes nothing, so the inf-norm must still work."""
    empty, full = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(2))
    empty.grad, full.grad = torch.zeros(0), torch.tensor([3.0, -4.0])
    stats = apply_gradient_clipping([empty, full], "norm", 1.0, norm_type=math.inf)
    assert stats.grad_norm.item() == 4.0
    torch.testing.assert_close(full.grad, torch.tensor([0.75, -1.0]))


def test_process_group_must_be_a_group() -> None:
    """``process_group`` takes a torch.distributed ProcessGroup (from Python) or None; a name is refused."""
    assert GradientClipper("norm", 1.0, process_group=None).process_group is None
    with pytest.raises(TypeError, match=r"process_group: expected a torch\.distributed ProcessGroup") as err:
        GradientClipper("norm", 1.0, process_group="pp")
    assert "a YAML file cannot hold a process group: pass process_group= from Python" in str(err.value)


@pytest.mark.composer
def test_process_group_from_yaml_is_refused() -> None:
    """The YAML block names ``process_group`` as a key, but cannot hold a group: the error says so."""
    from gradclip_algo.config import build_algorithms

    block = {"gradclip_algo": {"clipping_type": "norm", "clipping_threshold": 1.0, "process_group": "pp"}}
    with pytest.raises(
        ValueError, match=r"algorithms\.gradclip_algo: GradClipAlgo: process_group: expected a torch"
    ):
        build_algorithms(block)
    assert build_algorithms({"gradclip_algo": {**block["gradclip_algo"], "process_group": None}})
