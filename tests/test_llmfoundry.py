"""The algorithm through llm-foundry's own registry, as an llm-foundry YAML builds it (``cls(**cfg)``).

Runs where llm-foundry is installed (``make llmfoundry-check`` makes such an environment); skipped elsewhere.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("llmfoundry")

import yaml  # noqa: E402
from composer.algorithms import GradientClipping  # noqa: E402
from llmfoundry.registry import algorithms as registry  # noqa: E402
from llmfoundry.utils.builders import build_algorithm  # noqa: E402

from gradclip_algo import GradClipAlgo  # noqa: E402
from gradclip_algo.config import preset_path, presets  # noqa: E402


def test_the_registry_name_builds_this_package_and_composers_name_builds_composers() -> None:
    assert registry.get("gradclip_algo") is GradClipAlgo
    ours = build_algorithm(
        "gradclip_algo", {"clipping_type": "norm", "clipping_threshold": 1.0, "log_interval": 5}
    )
    assert type(ours) is GradClipAlgo
    assert repr(ours) == "GradClipAlgo(clipping_type='norm', clipping_threshold=1.0, log_interval=5)"
    theirs = build_algorithm("gradient_clipping", {"clipping_type": "norm", "clipping_threshold": 1.0})
    assert type(theirs) is GradientClipping
    assert type(theirs).__qualname__ != type(ours).__qualname__  # distinct checkpoint entries


@pytest.mark.parametrize("name", presets())
def test_every_preset_block_builds_through_llm_foundry(name: str) -> None:
    block: dict[str, Any] = yaml.safe_load(preset_path(name).read_text())["algorithms"]
    assert list(block) == ["gradclip_algo"]
    algorithm = build_algorithm("gradclip_algo", dict(block["gradclip_algo"]))
    assert type(algorithm) is GradClipAlgo
    assert algorithm.clipper.clipping_threshold == float(block["gradclip_algo"]["clipping_threshold"])


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (
            {"clipping_type": "norm", "clip_threshold": 1.0},
            TypeError,
            r"GradClipAlgo: missing required key 'clipping_threshold'; got 'clip_threshold'",
        ),
        (
            {"clipping_type": "norm", "clipping_threshold": 1.0, "log_intervall": 10},
            TypeError,
            r"GradClipAlgo: unknown key\(s\) 'log_intervall' \(did you mean 'log_interval'\?\); allowed keys: "
            r"clipping_type, clipping_threshold, log_interval, ",
        ),
        (
            {"clipping_type": "zscore", "clipping_threshold": "inf"},
            ValueError,
            r"GradClipAlgo: clipping_threshold: .* got 'inf' \(str\); YAML reads inf as a string: write \.inf",
        ),
    ],
    ids=["misspelt-threshold", "misspelt-log-interval", "inf-string"],
)
def test_typos_through_llm_foundry_name_the_fix(settings: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        build_algorithm("gradclip_algo", settings)
