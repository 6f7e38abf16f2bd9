"""Every code block of README.md and docs/*.md runs as written, in a temporary folder.

``python`` blocks run in order, one namespace per document (a block may continue the one before it);
blocks that start with ``>>>`` are doctests, so the output they show is checked. A block opened with
``python title="name.py"`` is a script: it is saved under that name and launched on 2 CPU processes with
``torchrun --standalone --nproc_per_node 2 name.py``, as the page says. ``bash``, ``yaml`` and ``text`` blocks are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.composer  # the Composer snippets; the torch-only run deselects this file
sybil = pytest.importorskip("sybil")

from sybil.parsers.markdown import PythonCodeBlockParser  # noqa: E402
from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", *sorted(path.name for path in (ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r'python title="(?P<title>[\w.-]+\.py)"$\n', re.MULTILINE)


LAUNCHED: list[tuple[list[str], subprocess.Popen]] = []


def run_script(example: sybil.Example) -> None:
    """Save the script and launch it; the test waits for every launch at the end of its document."""
    title, source = example.parsed
    Path(title).write_text(source)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", title]
    launch = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    LAUNCHED.append((command, launch))


def script_blocks(document: sybil.Document):
    lexer = RawFencedCodeBlockLexer(info_pattern=SCRIPT, mapping={"title": "title", "source": "source"})
    for region in lexer(document):
        region.parsed = (region.lexemes["title"], str(region.lexemes["source"]))
        region.evaluator = run_script
        yield region


SYBIL = sybil.Sybil(parsers=[PythonCodeBlockParser(), script_blocks])


def path_of(name: str) -> Path:
    return ROOT / name if name == "README.md" else ROOT / "docs" / name


@pytest.mark.parametrize("name", DOCUMENTS)
def test_code_blocks_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands here
    document = SYBIL.parse(path_of(name))
    for example in document.examples():
        try:
            example.evaluate()
        except Exception as err:
            raise AssertionError(f"{name}, line {example.line}: {err}") from err
    while LAUNCHED:
        command, launch = LAUNCHED.pop()
        output, _ = launch.communicate(timeout=300)
        assert launch.returncode == 0, f"{' '.join(command)} exited with {launch.returncode}:\n{output}"
