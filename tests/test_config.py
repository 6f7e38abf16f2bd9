"""``build_algorithms``: llm-foundry's ``algorithms:`` block to Composer algorithms, and the entry point."""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("composer")

from omegaconf import OmegaConf  # noqa: E402

import gradclip_algo  # noqa: E402
from gradclip_algo import GradClipAlgo  # noqa: E402
from gradclip_algo.clipper import COMMON_OPTIONS  # noqa: E402
from gradclip_algo.config import (  # noqa: E402
    ALGORITHM_NAMES,
    build_algorithms,
    preset_path,
    presets,
)
from gradclip_algo.keys import ALGORITHM_KEYS, allowed_fields  # noqa: E402
from gradclip_algo.rules import RULES  # noqa: E402

SETTINGS = {"clipping_type": "norm", "clipping_threshold": 1.0}
BLOCK = {"gradclip_algo": SETTINGS}
NORM_1 = "GradClipAlgo(clipping_type='norm', clipping_threshold=1.0, log_interval=1)"


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
    ],
    ids=["block", "top-level", "whole-run", "dictconfig-block", "dictconfig-top-level"],
)
def test_dict_and_dictconfig_inputs(cfg: Any) -> None:
    algorithms = build_algorithms(cfg)
    assert [type(algorithm) for algorithm in algorithms] == [GradClipAlgo]
    assert reprs(algorithms) == [NORM_1]


def test_yaml_paths_with_the_block_or_a_top_level_key(tmp_path: Path) -> None:
    block = "gradclip_algo:\n  clipping_type: value\n  clipping_threshold: 15\n  log_interval: 10\n"
    top_level = "run_name: demo\nalgorithms:\n" + "".join(f"  {line}\n" for line in block.splitlines())
    want = ["GradClipAlgo(clipping_type='value', clipping_threshold=15.0, log_interval=10)"]
    assert reprs(build_algorithms(write(tmp_path / "block.yaml", block))) == want
    assert reprs(build_algorithms(str(write(tmp_path / "run.yaml", top_level)))) == want


def test_yaml_lists_and_scientific_notation_reach_the_clipper(tmp_path: Path) -> None:
    text = (
        "algorithms:\n  gradclip_algo:\n    clipping_type: adaptive\n    clipping_threshold: 0.01\n"
        "    eps: 1e-4\n    exclude: ['*fc.*', '*lm_head.*']\n    nonfinite: zero\n"
    )
    (algorithm,) = build_algorithms(write(tmp_path / "agc.yaml", text))
    assert algorithm.clipper.options.as_dict() == {"eps": 1e-4}
    assert algorithm.clipper.exclude == ["*fc.*", "*lm_head.*"]
    assert type(algorithm.clipper.exclude) is list
    assert algorithm.clipper.nonfinite == "zero"


@pytest.mark.parametrize("cfg", [{}, {"algorithms": None}, {"algorithms": {}}])
def test_empty_block_builds_nothing(cfg: dict[str, Any]) -> None:
    assert build_algorithms(cfg) == []


def test_dotlist_and_cli_overrides_change_the_threshold(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", OmegaConf.to_yaml({"algorithms": BLOCK}))
    base = OmegaConf.load(path)
    dotlist = OmegaConf.from_dotlist(["algorithms.gradclip_algo.clipping_threshold=0.25"])
    (from_dotlist,) = build_algorithms(OmegaConf.merge(base, dotlist))
    assert from_dotlist.clipper.clipping_threshold == 0.25
    cli = OmegaConf.from_cli(["algorithms.gradclip_algo.clipping_threshold=2e-1", "run_name=override"])
    (from_cli,) = build_algorithms(OmegaConf.merge(base, cli))
    assert from_cli.clipper.clipping_threshold == pytest.approx(0.2)
    assert build_algorithms(base)[0].clipper.clipping_threshold == 1.0


def test_the_key_schema_lists_the_algorithms_own_arguments() -> None:
    parameters = inspect.signature(GradClipAlgo).parameters.values()
    assert tuple(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD) == ALGORITHM_KEYS


def test_every_rule_option_is_an_allowed_key() -> None:
    """The schema comes from RULES and COMMON_OPTIONS, so clipping types added later need no edit here."""
    assert set(allowed_fields()) == {
        *ALGORITHM_KEYS,  # GradClipAlgo's own arguments (the test above)
        *COMMON_OPTIONS,
        *(option for rule in RULES.values() for option in rule.options.names()),
    }
    for clipping_type, rule in RULES.items():
        defaults = rule.options().as_dict()
        settings = {"clipping_type": clipping_type, "clipping_threshold": 1.0, **defaults}
        (algorithm,) = build_algorithms({"gradclip_algo": settings})
        assert algorithm.clipper.clipping_type == clipping_type
        assert algorithm.clipper.options.as_dict() == defaults


ALLOWED = ", ".join(allowed_fields())


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"gradclip_algo": {**SETTINGS, "max_norm": 1.0}},
            rf"^algorithms\.gradclip_algo: GradClipAlgo: unknown key\(s\) 'max_norm'; allowed keys: {ALLOWED}$",
        ),
        (
            {"gradclip_algo": {**SETTINGS, "log_intervall": 10}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: unknown key\(s\) 'log_intervall' \(did you mean "
            rf"'log_interval'\?\); allowed keys: {ALLOWED}$",
        ),
        (
            {"gradclip_algo": {"clipping_type": "norm", "clip_threshold": 1.0}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: missing required key 'clipping_threshold'; got "
            r"'clip_threshold', which is not a key: did you mean 'clipping_threshold'\? allowed keys: ",
        ),
        (
            {"gradclip_algo": {"clipping_type": "norm", "clipping_threshold": "one"}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: clipping_threshold: expected a number > 0 and finite, "
            r"got 'one' \(str\)$",
        ),
        (
            {"gradclip_algo": {"clipping_type": "zscore", "clipping_threshold": "inf"}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: clipping_threshold: expected a number > 0, got 'inf' "
            r"\(str\); YAML reads inf as a string: write \.inf$",
        ),
        (
            {"gradclip_algo": {"clipping_type": "norm", "clipping_threshold": "inf"}},
            r"got 'inf' \(str\); YAML reads inf as a string, and clipping_type='norm' needs a finite threshold$",
        ),
        (
            {"gradclip_algo": {"clipping_type": "norm", "clipping_threshold": -0.5}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: clipping_threshold: .* got -0\.5$",
        ),
        (
            {"gradclip_algo": {**SETTINGS, "log_interval": 0}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: log_interval: expected an integer >= 1 or a count of batches such as '10ba', got 0$",
        ),
        (
            {"gradclip_algo": {"clipping_type": "l2", "clipping_threshold": 1.0}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: clipping_type: expected one of 'norm', .* got 'l2'$",
        ),
        (
            {"gradclip_algo": {**SETTINGS, "eps": 1e-3}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: clipping_type='norm' got unknown option\(s\) eps; ",
        ),
        (
            {"gradclip_algo": {"clipping_threshold": 1.0}},
            r"^algorithms\.gradclip_algo: GradClipAlgo: missing required key\(s\) 'clipping_type'; allowed",
        ),
        (
            {"gradient_clipping": SETTINGS},
            r"^algorithms\.gradient_clipping: in llm-foundry this name builds Composer's own GradientClipping, "
            r"not GradClipAlgo; name the entry gradclip_algo",
        ),
        (
            {"grad_clipping": SETTINGS},
            r"^algorithms: unknown algorithm\(s\) grad_clipping; allowed: gradclip_algo$",
        ),
        ({"gradclip_algo": "norm"}, r"^algorithms\.gradclip_algo: expected a mapping of settings"),
        (["gradclip_algo"], r"^algorithms: expected a mapping of algorithm name -> settings"),
    ],
    ids=[
        "unknown-key",
        "misspelt-key",
        "misspelt-required-key",
        "wrong-type",
        "inf-as-string",
        "inf-as-string-for-norm",
        "bad-value",
        "bad-log-interval",
        "unknown-clipping-type",
        "option-of-another-type",
        "missing-clipping-type",
        "composers-name",
        "unknown-algorithm",
        "settings-not-a-mapping",
        "block-not-a-mapping",
    ],
)
def test_errors_name_the_field_the_value_and_what_is_allowed(block: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_algorithms(block)


def test_the_class_itself_names_a_misspelt_key_as_llm_foundry_calls_it() -> None:
    """llm-foundry calls ``cls(**cfg)``: the class, not ``build_algorithms``, must explain a typo."""
    with pytest.raises(TypeError, match=r"^GradClipAlgo: missing required key 'clipping_threshold'; got "):
        GradClipAlgo(**{"clipping_type": "norm", "clip_threshold": 1.0})
    with pytest.raises(TypeError, match=r"\(did you mean 'log_interval'\?\); allowed keys: .*log_interval"):
        GradClipAlgo(**{**SETTINGS, "log_intervall": 10})
    (inf,) = build_algorithms(
        {"gradclip_algo": {"clipping_type": "zscore", "clipping_threshold": float("inf")}}
    )
    assert inf.clipper.clipping_threshold == float("inf")


def test_the_class_name_is_not_composers() -> None:
    """Composer keys checkpoint entries by ``__qualname__`` and logs ``enabled_algorithms/<name>``."""
    from composer.algorithms import GradientClipping

    assert GradClipAlgo.__qualname__ == "GradClipAlgo" != GradientClipping.__qualname__
    assert not hasattr(gradclip_algo, "GradientClipping")


def test_presets_by_name_path_and_file_name() -> None:
    assert len(presets()) == 8 and "agc_0.01_large_batch" in presets()
    by_name = build_algorithms("agc_0.01_large_batch")
    assert reprs(by_name) == reprs(build_algorithms("agc_0.01_large_batch.yaml"))
    assert reprs(by_name) == reprs(build_algorithms(preset_path("agc_0.01_large_batch")))
    assert reprs(by_name) == [
        "GradClipAlgo(clipping_type='adaptive', clipping_threshold=0.01, log_interval=1, eps=0.001, "
        "exclude=['*fc.*'])"
    ]
    with pytest.raises(
        ValueError, match=r"^agc_0\.02: no such file or preset; presets: agc_0\.01_large_batch, "
    ):
        build_algorithms("agc_0.02")


def test_presets_load_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (algorithm,) = build_algorithms("mikolov_value_15")
    assert algorithm.clipper.clipping_type == "value" and algorithm.clipper.clipping_threshold == 15.0


def test_llm_foundry_entry_point() -> None:
    """llm-foundry finds the algorithm as ``gradclip_algo``; its own ``gradient_clipping`` is left alone."""
    registered = entry_points(group="llmfoundry_algorithms")
    ours = [ep for ep in registered if ep.value.startswith("gradclip_algo")]
    assert [ep.name for ep in ours] == ["gradclip_algo"]
    assert ours[0].load() is GradClipAlgo
    assert ALGORITHM_NAMES == ("gradclip_algo",)


@pytest.mark.parametrize(("value", "interval"), [("10ba", 10), ("1e1ba", 10), (" 3 BA ", 3), (4, 4)])
def test_log_interval_takes_composer_batch_strings(value: Any, interval: int) -> None:
    (algorithm,) = build_algorithms({"gradclip_algo": {**SETTINGS, "log_interval": value}})
    assert isinstance(algorithm, GradClipAlgo) and algorithm.log_interval == interval


@pytest.mark.parametrize("value", ["1ep", "0.5dur", "100sp", "2tok"])
def test_log_interval_in_other_units_is_refused_in_one_line(value: str) -> None:
    with pytest.raises(ValueError) as err:
        build_algorithms({"gradclip_algo": {**SETTINGS, "log_interval": value}})
    assert str(err.value) == (
        "algorithms.gradclip_algo: GradClipAlgo: log_interval: only batches are allowed here (it counts "
        f"optimizer steps): expected an integer >= 1 or a count of batches such as '10ba', got {value!r}"
    )


@pytest.mark.parametrize("value", ["0ba", "1.5ba", "ba", "10 batches"])
def test_log_interval_strings_that_are_no_count_of_batches(value: str) -> None:
    with pytest.raises(ValueError, match=r"log_interval: expected an integer >= 1 or a count of batches"):
        GradClipAlgo("norm", 1.0, log_interval=value)
