"""``build_algorithms``: llm-foundry's ``algorithms:`` block to Composer algorithms, and the entry point."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("composer")

from omegaconf import OmegaConf  # noqa: E402

import gradclip_algo  # noqa: E402
from gradclip_algo import GradientClipping  # noqa: E402
from gradclip_algo.clipper import COMMON_OPTIONS  # noqa: E402
from gradclip_algo.config import ALGORITHM_NAMES, allowed_fields, build_algorithms  # noqa: E402
from gradclip_algo.rules import RULES  # noqa: E402

BLOCK = {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}}
NORM_1 = "GradientClipping(clipping_type='norm', clipping_threshold=1.0, log_interval=1)"


def reprs(algorithms: list[Any]) -> list[str]:
    return [repr(algorithm) for algorithm in algorithms]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_lazy_export_is_the_same_function() -> None:
    assert gradclip_algo.build_algorithms is build_algorithms


@pytest.mark.parametrize(
    "cfg",
    [
        BLOCK,
        {"algorithms": BLOCK},
        {"algorithms": BLOCK, "max_duration": "10ba", "model": {"name": "mpt_causal_lm"}},
        OmegaConf.create(BLOCK),
        OmegaConf.create({"algorithms": BLOCK, "seed": 17}),
        {"gradclip_algo": BLOCK["gradient_clipping"]},
    ],
    ids=["block", "top-level", "whole-run", "dictconfig-block", "dictconfig-top-level", "package-key"],
)
def test_dict_and_dictconfig_inputs(cfg: Any) -> None:
    algorithms = build_algorithms(cfg)
    assert [type(algorithm) for algorithm in algorithms] == [GradientClipping]
    assert reprs(algorithms) == [NORM_1]


def test_yaml_paths_with_the_block_or_a_top_level_key(tmp_path: Path) -> None:
    block = "gradient_clipping:\n  clipping_type: value\n  clipping_threshold: 15\n  log_interval: 10\n"
    top_level = "run_name: demo\nalgorithms:\n" + "".join(f"  {line}\n" for line in block.splitlines())
    want = ["GradientClipping(clipping_type='value', clipping_threshold=15.0, log_interval=10)"]
    assert reprs(build_algorithms(write(tmp_path / "block.yaml", block))) == want
    assert reprs(build_algorithms(str(write(tmp_path / "run.yaml", top_level)))) == want


def test_yaml_lists_and_scientific_notation_reach_the_clipper(tmp_path: Path) -> None:
    text = (
        "algorithms:\n  gradclip_algo:\n    clipping_type: adaptive\n    clipping_threshold: 0.01\n"
        "    eps: 1e-4\n    exclude: ['*fc.*', '*lm_head.*']\n    nonfinite: zero\n"
    )
    (algorithm,) = build_algorithms(write(tmp_path / "agc.yaml", text))
    assert algorithm.clipper.rule_options == {"eps": 1e-4}
    assert algorithm.clipper.exclude == ["*fc.*", "*lm_head.*"]
    assert type(algorithm.clipper.exclude) is list
    assert algorithm.clipper.nonfinite == "zero"


@pytest.mark.parametrize("cfg", [{}, {"algorithms": None}, {"algorithms": {}}])
def test_empty_block_builds_nothing(cfg: dict[str, Any]) -> None:
    assert build_algorithms(cfg) == []


def test_dotlist_and_cli_overrides_change_the_threshold(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", OmegaConf.to_yaml({"algorithms": BLOCK}))
    base = OmegaConf.load(path)
    dotlist = OmegaConf.from_dotlist(["algorithms.gradient_clipping.clipping_threshold=0.25"])
    (from_dotlist,) = build_algorithms(OmegaConf.merge(base, dotlist))
    assert from_dotlist.clipper.clipping_threshold == 0.25
    cli = OmegaConf.from_cli(["algorithms.gradient_clipping.clipping_threshold=2e-1", "run_name=override"])
    (from_cli,) = build_algorithms(OmegaConf.merge(base, cli))
    assert from_cli.clipper.clipping_threshold == pytest.approx(0.2)
    assert build_algorithms(base)[0].clipper.clipping_threshold == 1.0


def test_every_rule_option_is_an_allowed_key() -> None:
    """The schema comes from RULES and COMMON_OPTIONS, so clipping types added later need no edit here."""
    assert set(allowed_fields()) == {
        "clipping_type",
        "clipping_threshold",
        "log_interval",
        "log_layer_norms",
        *COMMON_OPTIONS,
        *(option for rule in RULES.values() for option in rule.options),
    }
    for clipping_type, rule in RULES.items():
        defaults = {name: default for name, (default, _) in rule.options.items()}
        settings = {"clipping_type": clipping_type, "clipping_threshold": 1.0, **defaults}
        (algorithm,) = build_algorithms({"gradient_clipping": settings})
        assert algorithm.clipper.clipping_type == clipping_type
        assert algorithm.clipper.rule_options == defaults


ALLOWED = ", ".join(allowed_fields())


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"gradient_clipping": {**BLOCK["gradient_clipping"], "max_norm": 1.0}},
            rf"^algorithms\.gradient_clipping: unknown key\(s\) max_norm; allowed: {ALLOWED}$",
        ),
        (
            {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": "one"}},
            r"^algorithms\.gradient_clipping: clipping_threshold: expected a number > 0 and finite, "
            r"got 'one' \(str\)$",
        ),
        (
            {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": -0.5}},
            r"^algorithms\.gradient_clipping: clipping_threshold: .* got -0\.5$",
        ),
        (
            {"gradient_clipping": {**BLOCK["gradient_clipping"], "log_interval": 0}},
            r"^algorithms\.gradient_clipping: log_interval: expected an integer >= 1, got 0$",
        ),
        (
            {"gradclip_algo": {"clipping_type": "l2", "clipping_threshold": 1.0}},
            r"^algorithms\.gradclip_algo: clipping_type: expected one of 'norm', .* got 'l2'$",
        ),
        (
            {"gradient_clipping": {**BLOCK["gradient_clipping"], "eps": 1e-3}},
            r"^algorithms\.gradient_clipping: clipping_type='norm' got unknown option\(s\) eps; allowed: ",
        ),
        (
            {"gradient_clipping": {"clipping_threshold": 1.0}},
            r"^algorithms\.gradient_clipping: missing required key\(s\) clipping_type$",
        ),
        (
            {"grad_clipping": BLOCK["gradient_clipping"]},
            r"^algorithms: unknown algorithm\(s\) grad_clipping; allowed: gradient_clipping, gradclip_algo$",
        ),
        (
            {**BLOCK, "gradclip_algo": BLOCK["gradient_clipping"]},
            r"^algorithms: gradient_clipping and gradclip_algo name the same algorithm",
        ),
        ({"gradient_clipping": "norm"}, r"^algorithms\.gradient_clipping: expected a mapping of settings"),
        (["gradient_clipping"], r"^algorithms: expected a mapping of algorithm name -> settings"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "bad-value",
        "bad-log-interval",
        "unknown-clipping-type",
        "option-of-another-type",
        "missing-clipping-type",
        "unknown-algorithm",
        "both-names",
        "settings-not-a-mapping",
        "block-not-a-mapping",
    ],
)
def test_errors_name_the_field_the_value_and_what_is_allowed(block: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_algorithms(block)


def test_llm_foundry_entry_point() -> None:
    """llm-foundry finds the algorithm as ``gradclip_algo``; its own ``gradient_clipping`` is left alone."""
    registered = entry_points(group="llmfoundry_algorithms")
    ours = [ep for ep in registered if ep.value.startswith("gradclip_algo")]
    assert [ep.name for ep in ours] == ["gradclip_algo"]
    assert ours[0].load() is GradientClipping
    assert "gradclip_algo" in ALGORITHM_NAMES
