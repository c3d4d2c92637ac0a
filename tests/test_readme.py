"""The README's first two shell blocks are the user contract: check their form and CI's use."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT
from tools.readme_commands import README, shell_blocks


def test_first_two_blocks_are_single_command_lines() -> None:
    blocks = shell_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    for block in blocks[:2]:
        assert "\n" not in block, f"not one command line: {block!r}"
    quickstart, tests = blocks[:2]
    assert "-m tools.quickstart" in quickstart and '".[cpu]"' in quickstart
    assert "-m pytest" in tests and "dev" in tests


def test_ci_runs_the_readme_test_command() -> None:
    printed = subprocess.run(
        [sys.executable, "tools/readme_commands.py", "--index", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert printed == shell_blocks(README.read_text(encoding="utf-8"))[1]
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_commands.py --index 2" in ci


def test_shell_blocks_ignore_other_fences() -> None:
    text = "```text\nnot me\n```\n```bash\nfirst\n```\n```python\nno\n```\n```sh\nsecond\n```\n"
    assert shell_blocks(text) == ["first", "second"]
