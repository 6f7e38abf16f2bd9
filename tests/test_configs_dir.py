"""Every YAML file under the repository's configs/ (the run configs and presets/, shipped with the package):
presets build; training configs parse and their block builds; every block uses the registry name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("composer")

import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from gradclip_algo import GradClipAlgo  # noqa: E402
from gradclip_algo.config import build_algorithms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
YAML_FILES = sorted(
    [
        *(ROOT / "configs").rglob("*.yaml"),
        *(ROOT / "configs").rglob("*.yml"),
    ]
)
PRESETS = sorted((ROOT / "configs" / "presets").glob("*.yaml"))
# file names carry the setting: <source>_<type>_<threshold>.yaml, or agc_<threshold>_<batch>.yaml
PRESET_NAME = re.compile(r"_(?P<type>norm|value)_(?P<threshold>[0-9.]+)$|^agc_(?P<agc>[0-9.]+)_")


def test_the_literature_presets_are_there() -> None:
    assert {path.stem for path in PRESETS} == {
        "inception_norm_2.0",
        "ctrl_norm_0.25",
        "tabert_norm_1.0",
        "compressive_transformer_norm_0.1",
        "mikolov_value_15",
        "agc_0.01_large_batch",
        "agc_0.08_small_batch",
        "agc_0.16_batch_128_256",
    }


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_yaml_file_parses_and_its_algorithms_build(path: Path) -> None:
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    # llm-foundry builds Composer's own class for `gradient_clipping`: every block names this package
    assert set(cfg.get("algorithms") or {}) <= {"gradclip_algo"}, path.name
    if set(cfg) != {"algorithms"}:  # a full training config: its block, if any, must build
        assert all(
            isinstance(algorithm, GradClipAlgo) for algorithm in build_algorithms(cfg.get("algorithms"))
        )
        return
    (algorithm,) = build_algorithms(path)
    match = PRESET_NAME.search(path.stem)
    assert match is not None, (
        f"{path.name}: preset names end in _<type>_<threshold> or start agc_<threshold>_"
    )
    clipping_type = "adaptive" if match["agc"] else match["type"]
    assert algorithm.clipper.clipping_type == clipping_type
    assert algorithm.clipper.clipping_threshold == float(match["agc"] or match["threshold"])
    header = " ".join(line for line in path.read_text().splitlines() if line.startswith("# "))
    assert re.search(r"Sources?: .*\b(19|20)\d\d\b", header), f"{path.name}: name the paper and its year"


@pytest.mark.parametrize(
    "path", [path for path in PRESETS if path.stem.startswith("agc_")], ids=lambda p: p.stem
)
def test_agc_presets_leave_the_final_classifier_unclipped(path: Path) -> None:
    """The exclude glob matches torchvision's ``fc``, timm's ``head.fc`` and Composer's ``module.`` prefix."""
    (algorithm,) = build_algorithms(path)
    model = nn.ModuleDict(
        {
            "stem": nn.Linear(4, 4),
            "fc": nn.Linear(4, 2),
            "head": nn.ModuleDict({"fc": nn.Linear(4, 2)}),
            "module": nn.ModuleDict({"fc": nn.Linear(4, 2), "fc1": nn.Linear(4, 4)}),
        }
    )
    for param in model.parameters():
        param.grad = torch.full_like(param, 100.0)
    algorithm.clipper(model)
    for name, param in model.named_parameters():
        kept = torch.equal(param.grad, torch.full_like(param, 100.0))
        assert kept == (name.split(".")[-2] == "fc"), name
