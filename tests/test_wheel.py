"""The wheel: built with ``pip wheel --no-deps``, installed into a fresh venv holding torch alone.

It checks what a user of ``pip install gradclip_algo`` gets: torch as the only requirement, the presets,
run configs, ``py.typed`` and the LICENSE inside, the functional API working, both commands' ``--help``,
and one line naming the extra to install where Composer or omegaconf is missing.

It runs in the torch-only environment (``make test-core``), where Composer is absent. The fresh venv sees
the running torch and its requirements through a ``.pth`` file naming a directory of links to their files
(a copy of torch would take a minute), and pip installs the wheel into it without an index, so the wheel's
requirements must already be met by torch alone.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.wheel,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("composer") is not None,
        reason="runs in the torch-only environment (make test-core), where Composer is absent",
    ),
]

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "agc_0.01_large_batch",
    "agc_0.08_small_batch",
    "agc_0.16_batch_128_256",
    "compressive_transformer_norm_0.1",
    "ctrl_norm_0.25",
    "inception_norm_2.0",
    "mikolov_value_15",
    "tabert_norm_1.0",
}

PROBE = """
import importlib.metadata as md, importlib.resources as res, json, sys
import torch
from torch import nn
import gradclip_algo
from gradclip_algo import apply_gradient_clipping

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
nn.functional.mse_loss(model(torch.randn(16, 4) * 100), torch.randn(16, 1)).backward()
stats = apply_gradient_clipping(model, "norm", 0.5)
after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])).item()
errors = {}
for name in ("GradClipAlgo", "build_algorithms"):
    try:
        getattr(gradclip_algo, name)
    except ModuleNotFoundError as err:
        errors[name] = str(err)
package = res.files("gradclip_algo")
print(json.dumps({
    "module": gradclip_algo.__file__,
    "grad_norm": stats.grad_norm.item(),
    "after": after,
    "errors": errors,
    "presets": sorted(p.name for p in (package / "configs" / "presets").iterdir()),
    "configs": sorted(p.name for p in (package / "configs").iterdir() if p.name.endswith(".yaml")),
    "py_typed": (package / "py.typed").is_file(),
    "license_files": [str(f) for f in md.files("gradclip_algo") if f.name == "LICENSE"],
    "license": md.metadata("gradclip_algo").get("License-Expression"),
    "requires": md.requires("gradclip_algo"),
    "installed": sorted(d.metadata["Name"].lower() for d in md.distributions()),
}))
"""


# torch warns on import when numpy is absent, as it is in a torch-only venv; nothing else is silenced
QUIET_TORCH = {**os.environ, "PYTHONWARNINGS": "ignore:Failed to initialize NumPy"}


def run(args: list[str | Path], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=QUIET_TORCH,
    )


def torch_closure() -> list[md.Distribution]:
    """torch's distribution and those of everything it requires (extras aside), recursively."""
    found: dict[str, md.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = re.split(r"[<>=!~;\[ ]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in found:
            continue
        found[name] = md.distribution(name)
        todo += [req for req in found[name].requires or [] if "extra ==" not in req]
    return list(found.values())


def link_torch(into: Path) -> None:
    """Symlink the installed files of torch and its requirements (their top-level packages, modules and
    ``.dist-info``) into ``into``: a site directory holding torch alone, without a copy of its 1 GB."""
    into.mkdir()
    for dist in torch_closure():
        tops = {Path(str(file)).parts[0] for file in dist.files or []}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and top not in ("..", "__pycache__") and not (into / top).exists():
                (into / top).symlink_to(source)


@pytest.fixture(scope="module")
def torch_only_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv without system site packages that sees this interpreter's torch (and its requirements)
    and nothing else, with the wheel installed into it by pip."""
    root = tmp_path_factory.mktemp("wheel")
    env = root / "venv"
    try:
        venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot create a venv here: {err}")
    link_torch(root / "torch-site")
    (site_packages,) = (env / "lib").glob("python3*/site-packages")
    (site_packages / "torch_site.pth").write_text(f"{root / 'torch-site'}\n")
    # a copy of the sources, so the build leaves nothing in the repository (and finds nothing stale there)
    source = root / "source"
    ignored = (".*", "build", "dist", "runs", "site", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*ignored))
    pip = [sys.executable, "-m", "pip"]
    built = run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], root)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("gradclip_algo-*.whl")
    # no index: pip must find the wheel's one requirement, torch, already in the venv
    installed = run([*pip, "--python", env / "bin" / "python", "install", "-q", "--no-index", wheel], root)
    assert installed.returncode == 0, installed.stderr
    return env


def test_the_wheel_needs_torch_alone_and_ships_its_data(torch_only_venv: Path) -> None:
    probe = run([torch_only_venv / "bin" / "python", "-c", PROBE], torch_only_venv.parent)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert str(torch_only_venv) in found["module"]  # the installed wheel, not the repository
    assert found["grad_norm"] > 0.5 and found["after"] == pytest.approx(0.5, rel=1e-5)
    assert found["errors"] == {
        "GradClipAlgo": "gradclip_algo.GradClipAlgo needs composer, which is not installed: "
        'pip install "gradclip_algo[composer]"',
        "build_algorithms": "gradclip_algo.build_algorithms needs composer, which is not installed: "
        'pip install "gradclip_algo[composer]"',
    }
    assert {name.removesuffix(".yaml") for name in found["presets"]} == PRESETS
    assert found["configs"] == ["demo_clipped.yaml", "demo_lm.yaml", "demo_unclipped.yaml"]
    assert found["py_typed"] is True
    assert found["license_files"] and found["license"] == "Apache-2.0"
    core = [req for req in found["requires"] if "extra ==" not in req]
    assert [req.split(">")[0].strip() for req in core] == ["torch"]
    assert {"omegaconf", "mosaicml"}.isdisjoint(found["installed"])


@pytest.mark.parametrize("command", ["gradclip-train", "gradclip-calibrate"])
def test_both_commands_help_and_name_the_missing_extra(torch_only_venv: Path, command: str) -> None:
    script = torch_only_venv / "bin" / command
    shown = run([script, "--help"], torch_only_venv.parent)
    assert shown.returncode == 0 and shown.stderr == ""
    assert shown.stdout.startswith(f"usage: {command} ")
    args = ["demo_clipped"] + (["--steps", "5"] if command == "gradclip-calibrate" else [])
    ran = run([script, *args], torch_only_venv.parent)
    assert ran.returncode == 1
    assert ran.stderr.splitlines() == [
        f'{command}: error: composer is not installed: pip install "gradclip_algo[composer]"'
    ]
