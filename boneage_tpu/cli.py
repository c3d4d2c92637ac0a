"""Flag parsing shared by the command-line entry points: help, one-line usage errors."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

HELP_ARGS = ("-h", "-help", "--help", "--helpfull", "--helpshort")


def parse_flags(
    prog: str,
    flag_values: flags.FlagValues,
    argv: Sequence[str],
    doc: str | None,
    *,
    positional: bool = False,
    required: Sequence[str] = (),
) -> tuple[list[str], int | None]:
    """Parses `argv` (argv[0] is the program) into `flag_values`.

    Args:
      prog: program name for the `prog: error: ...` line.
      flag_values: the command's flags, already defined.
      argv: the command line.
      doc: the module docstring, printed above the flags for --help.
      positional: whether arguments other than flags are allowed (e.g. image paths).
      required: flags that must be given a non-empty value.

    Returns:
      (positional arguments, None) to go on, or ([], exit status) when the command must stop:
      0 after printing the help, 2 after printing one usage-error line to stderr.
    """
    if any(arg in HELP_ARGS for arg in argv[1:]):
        print(doc or "")
        print(flag_values.get_help())
        return [], 0
    try:
        rest = flag_values(list(argv))[1:]
        if rest and not positional:
            raise flags.Error(f"unexpected arguments: {rest}")
        missing = [f"--{name}" for name in required if not flag_values[name].value]
        if missing:
            raise flags.Error(f"missing required flag(s): {', '.join(missing)}")
    except flags.Error as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return [], 2
    return rest, None
