"""`--help` prints help and exits 0 wherever a user types it: every console script and tool."""

from __future__ import annotations

import configparser
import importlib
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def console_scripts() -> list[tuple[str, str]]:
    """Returns (script name, "module:function") of every console script in setup.cfg."""
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return [tuple(part.strip() for part in line.split("=")) for line in lines]


def tool_modules() -> list[str]:
    """Returns every `python -m tools.<name>` a user can run (found, so new tools are covered)."""
    tools = REPO_ROOT / "tools"
    modules = [f"tools.{p.parent.name}" for p in tools.glob("*/__main__.py")]
    modules += [
        f"tools.{p.stem}"
        for p in tools.glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")
    ]
    return sorted(modules)


def test_the_lists_are_found():
    assert (
        "boneage-verify-tfrecords",
        "boneage_tpu.cli.verify_tfrecords:main",
    ) in console_scripts()
    assert {"tools.make_tfrecords", "tools.verify_tfrecords", "tools.benchmark_real"} <= set(
        tool_modules()
    )


@pytest.mark.parametrize(("script", "target"), console_scripts())
def test_console_scripts_print_help_and_exit_0(capsys, script, target):
    module, function = target.split(":")
    assert getattr(importlib.import_module(module), function)([script, "--help"]) == 0
    printed = capsys.readouterr()
    assert "--" in printed.out and not printed.err, script


# These tools start TensorFlow before they print their help: ~6 s each on 2 cores, so they run
# in the full suite (CI) and the fast tier (`-m "not slow"`) checks the other tools.
STARTS_TENSORFLOW = {
    "tools.benchmark_beam",
    "tools.benchmark_convert",
    "tools.make_tfrecords",
    "tools.verify_tfrecords",
}


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(m, marks=pytest.mark.slow) if m in STARTS_TENSORFLOW else m
        for m in tool_modules()
    ],
)
def test_tools_print_help_and_exit_0(module):
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 0, (module, done.stderr[-2000:])
    assert "--" in done.stdout, (module, done.stdout)
