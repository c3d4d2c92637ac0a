"""The Colab notebook is a valid notebook and its shell commands use the package's real flags."""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "colab_tpu.ipynb"
_COMMAND = re.compile(r"^\s*!python -m ([\w.]+)(.*)$", re.MULTILINE)
_FLAG = re.compile(r"--(\w+)")


def notebook_commands() -> dict[str, set[str]]:
    """Returns module -> the flag names its `!python -m module ...` lines use."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    commands: dict[str, set[str]] = {}
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for module, args in _COMMAND.findall(cell.source):
                commands.setdefault(module, set()).update(_FLAG.findall(args))
    return commands


def helpfull_flags(module: str) -> set[str]:
    """Returns the flag names that `python -m module --helpfull` documents."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--helpfull"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = result.stdout + result.stderr
    names = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", text, re.MULTILINE))
    assert names, f"{module} --helpfull printed no flags:\n{text[-2000:]}"
    return names


def test_notebook_is_valid() -> None:
    nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))


def test_notebook_runs_the_whole_tpu_workflow() -> None:
    commands = notebook_commands()
    assert set(commands) == {
        "tools.make_phantom",
        "tools.make_tfrecords",
        "boneage_tpu.train",
        "boneage_tpu.evaluate",
    }
    assert {"tpu", "weights", "backbone"} <= commands["boneage_tpu.train"]
    source = NOTEBOOK.read_text(encoding="utf-8")
    for needed in ("--tpu=colab", "--weights imagenet", "authenticate_user", "report.png"):
        assert needed in source


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(notebook_commands()))
def test_notebook_flags_exist(module: str) -> None:
    unknown = notebook_commands()[module] - helpfull_flags(module)
    assert not unknown, f"{module} has no flags {sorted(unknown)}"
