"""Prints the README's N-th fenced shell block (the user contract), for CI and tests.

Standard library only: CI calls it before anything is installed.
"""

from __future__ import annotations

import argparse
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def shell_blocks(text: str) -> list[str]:
    """Returns the fenced bash/sh blocks of a markdown text, in order, stripped."""
    return [m.group(1).strip() for m in _BLOCK.finditer(text)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", type=int, required=True, help="1-based block number")
    args = parser.parse_args()
    blocks = shell_blocks(README.read_text(encoding="utf-8"))
    if not 1 <= args.index <= len(blocks):
        raise SystemExit(f"README.md has {len(blocks)} shell blocks, asked for #{args.index}")
    print(blocks[args.index - 1])


if __name__ == "__main__":
    main()
