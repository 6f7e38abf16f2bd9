"""DDP, FSDP1 and FSDP2 on 2 CPU ranks (gloo), against a single-process reference on the same global batch.

All cases run in one spawn of 2 ranks (tests/distributed_worker.py; the Composer ones in
tests/distributed_composer_cases.py); each test reports one case's outcome on both ranks.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from distributed_worker import CASES, run_cases

from gradclip_algo import apply_gradient_clipping

COMPOSER_MODULE = "distributed_composer_cases"
if importlib.util.find_spec("composer") is not None:
    from distributed_composer_cases import COMPOSER_CASES
else:
    COMPOSER_CASES = {}
TORCH_CASES = [case for case in CASES if case not in COMPOSER_CASES]


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest) -> dict[str, list[str | None]]:
    """Run the selected cases (only those), all in one spawn."""
    specs = [
        getattr(item, "callspec", None) for item in request.session.items if item.module is request.module
    ]
    # an empty parametrisation (no Composer) leaves a placeholder that is not a case name
    selected = [spec.params["case"] for spec in specs if spec and isinstance(spec.params.get("case"), str)]
    return run_cases(selected, COMPOSER_MODULE if COMPOSER_CASES else None)


def assert_passed_on_every_rank(outcomes: dict[str, list[str | None]], case: str) -> None:
    failures = [f"rank {rank}:\n{error}" for rank, error in enumerate(outcomes[case]) if error is not None]
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.mark.parametrize("case", TORCH_CASES)
def test_two_ranks(outcomes: dict[str, list[str | None]], case: str) -> None:
    assert_passed_on_every_rank(outcomes, case)


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
