"""The Colab notebook is a valid notebook and its shell commands use the package's real flags."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys

import nbformat
import pytest

from boneage_tpu.core import distribute
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
        "boneage_tpu.phantom",
        "boneage_tpu.convert",
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


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.]+)", text))


def tpu_extra_pins() -> dict[str, str]:
    """Returns name -> version of setup.cfg's `tpu` extra's exact pins (TensorFlow, libtpu).

    Its only other requirement bounds protobuf below 7 (tensorflow-tpu 2.20 sets no bound).
    """
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    lines = [v.strip() for v in parser["options.extras_require"]["tpu"].splitlines() if v.strip()]
    pins = _pins("\n".join(lines))
    others = [line for line in lines if "==" not in line]
    assert len(others) == 1 and others[0].startswith("protobuf") and "<7" in others[0], lines
    return pins


def test_install_cell_pins_the_tpu_extra_from_tensorflows_libtpu_index() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    install = next(c.source for c in notebook.cells if "pip install" in c.source)
    pins = tpu_extra_pins()
    assert set(pins) == {"tensorflow-tpu", "libtpu"} and pins["tensorflow-tpu"].startswith("2.20.")
    assert _pins(install) == pins
    for line in install.splitlines():
        if "pip install" in line:
            assert "-f https://storage.googleapis.com/libtpu-tf-releases/index.html" in line
    assert "libtpu-releases" not in install  # JAX's index
    assert _pins(distribute.TPU_INSTALL_HINT) == pins
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for name, version in pins.items():
        assert f"{name}=={version}" in readme


def test_notebook_kernel_never_imports_tensorflow() -> None:
    """The TPU build claims the TPU at import: a kernel holding it would block the next
    `!python -m boneage_tpu.train`."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            python = "\n".join(
                line
                for line in cell.source.splitlines()
                if not line.lstrip().startswith(("!", "%"))
            )
            assert not re.search(
                r"^\s*(import|from)\s+(tensorflow|keras|boneage_tpu)", python, re.M
            )


def test_notebook_shows_the_runtime_the_trainer_picks() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in notebook.cells)
    for name in ("NEXT_PLUGGABLE_DEVICE_USE_C_API", "TF_PLUGGABLE_DEVICE_LIBRARY_PATH", "PJRT"):
        assert name in text
    (code,) = re.findall(r'^!python -c "(.*tpu_runtime.*)"$', text, re.M)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    # No TPU here: the trainer's default (StreamExecutor), and no variable to set.
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "TPU (generation unknown): StreamExecutor runtime, no TPU build"
