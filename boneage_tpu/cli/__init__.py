"""Every command's command line: flags declared by a config dataclass, one error path.

A command's settings are one dataclass whose fields declare their flag with `option(...)`
(`boneage_tpu.core.options`, re-exported here). `define_flags` turns the class into absl
flags, `config_from_flags` builds (and checks) the config from the parsed flags, and `main`
runs a command:

  prog: error: <one line>   exit 2: bad command line (unknown flag, bad or out-of-range value)
                            exit 1: the run failed on a `boneage_tpu.Error` or an I/O error
An I/O error (any `OSError`, any `tf.errors.OpError`) is one line naming its kind, the path and
the operation; BONEAGE_TRACEBACK=1 also prints its traceback, for bug reports. Any other
exception is a bug: it keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from boneage_tpu.core import guard
from boneage_tpu.core.errors import Error, UsageError
from boneage_tpu.core.options import (
    Flag,
    base_type,
    build,
    check,
    flag_fields,
    flag_name,
    flags_of,
    flat,
    from_flat,
    group,
    option,
    range_text,
    replace,
)

__all__ = [
    "Flag",
    "base_type",
    "check",
    "config_from_flags",
    "define_flags",
    "flag_fields",
    "flag_name",
    "flags_of",
    "flat",
    "from_flat",
    "group",
    "keras_backend",
    "main",
    "option",
    "parse_flags",
    "replace",
]

HELP_ARGS = ("-h", "-help", "--help", "--helpfull", "--helpshort")


def define_flags(config_cls: type, flag_values: flags.FlagValues) -> None:
    """Defines one absl flag per `option` field of `config_cls` (and its groups)."""
    defaults = build(config_cls, lambda f: f.field.default)
    for flag in flags_of(config_cls):
        meta, name, kind = flag.field.metadata, flag.name, flag.kind
        if meta["positional"]:
            continue
        default = flag.get(defaults)
        text = meta["help"] + (f" Valid: {range_text(meta)}." if range_text(meta) else "")
        fv = {"flag_values": flag_values}
        listed = typing.get_origin(kind) is tuple
        if meta["choices"] and not listed:
            flags.DEFINE_enum(name, default, meta["choices"], text, **fv)
        elif kind is bool:
            flags.DEFINE_bool(name, default, text, **fv)
        elif kind is int:
            flags.DEFINE_integer(name, default, text, **fv)
        elif kind is float:
            flags.DEFINE_float(name, default, text, **fv)
        elif listed and typing.get_args(kind)[0] is str and not meta.get("comma_list"):
            flags.DEFINE_multi_string(name, list(default), text + " Repeat the flag.", **fv)
        elif listed:
            each = f" Each one of: {', '.join(meta['choices'])}." if meta["choices"] else ""
            flags.DEFINE_list(name, [str(v) for v in default], text + each, **fv)
        else:
            flags.DEFINE_string(name, default, text, **fv)
        for alias in meta.get("aliases", ()):
            flags.DEFINE_alias(alias, name, flag_values=flag_values)


def _flag_value(field: dataclasses.Field, kind: Any, value: Any) -> Any:
    if typing.get_origin(kind) is not tuple:
        return value
    item = typing.get_args(kind)[0]
    try:
        return tuple(item(v) for v in value or () if str(v).strip())
    except ValueError:
        raise UsageError(
            f"--{flag_name(field)} must be a comma-separated list of {item.__name__}s, got "
            f"{','.join(map(str, value))!r}"
        ) from None


def config_from_flags(
    config_cls: type, flag_values: flags.FlagValues, positional: Sequence[str] = ()
) -> Any:
    """Returns the checked config of parsed flags (and of the positional arguments).

    Raises:
      UsageError: a value cannot be converted, is out of its range or a required one is empty.
    """

    def value_of(flag: Flag) -> Any:
        if flag.field.metadata["positional"]:
            return tuple(positional)
        return _flag_value(flag.field, flag.kind, flag_values[flag.name].value)

    config = build(config_cls, value_of)
    check(config)
    return config


def parse_flags(
    prog: str,
    flag_values: flags.FlagValues,
    argv: Sequence[str],
    doc: str | None,
    *,
    positional: bool = False,
) -> tuple[list[str], int | None]:
    """Parses `argv` (argv[0] is the program) into `flag_values`.

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
            raise flags.Error(f"unexpected arguments: {rest} (flags are --name=value)")
    except flags.Error as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return [], 2
    return rest, None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


TRACEBACK_ENV = "BONEAGE_TRACEBACK"  # =1: a failed run also prints its traceback (bug reports).


def _run_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that end a run with one line: ours, and every I/O error (TensorFlow's too)."""
    errors: list[type[BaseException]] = [Error, OSError]
    tf = sys.modules.get("tensorflow")  # Only when loaded: the phantom runs without it.
    if tf is not None:
        errors.append(tf.errors.OpError)
    return tuple(errors)


def _operation(err: BaseException) -> str:
    """Names where an I/O error happened: the call that failed, in our function that made it."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    paths = [f.filename.replace("\\", "/") for f in frames]
    ours = [
        i
        for i, p in enumerate(paths)
        if "boneage_tpu/" in p and not p.endswith("boneage_tpu/cli.py")
    ]
    if not ours:
        return frames[-1].name
    last = ours[-1]
    module = paths[last].rsplit("boneage_tpu/", 1)[-1].removesuffix(".py").replace("/", ".")
    called = frames[last + 1].name if last + 1 < len(frames) else ""
    return (
        f"{called} in {module}.{frames[last].name}" if called else f"{module}.{frames[last].name}"
    )


def _failure_line(err: BaseException) -> str:
    """One line for a failed run: ours as is; an I/O error with its kind, path and operation."""
    if isinstance(err, Error):
        return guard.printable(_one_line(err))
    if isinstance(err, OSError):
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        text = err.strerror or str(err) or type(err).__name__
        text = f"{text}: {paths}" if paths else text
    else:  # A tf.errors.OpError: its message names the path.
        kind = type(err).__name__.removesuffix("Error")
        words = "".join(f" {c.lower()}" if c.isupper() else c for c in kind).strip()
        text = f"{words}: {getattr(err, 'message', '') or err}"
    operation = _operation(err)
    hint = f"; {TRACEBACK_ENV}=1 shows the traceback"
    return guard.printable(_one_line(text + (f" (during {operation}{hint})" if operation else "")))


def keras_backend() -> str:
    """Returns the Keras backend this process has or will get (Keras itself when loaded)."""
    keras = sys.modules.get("keras")
    if keras is not None:
        return keras.backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def main(
    prog: str,
    config_cls: type,
    job: Callable[[Any], object],
    argv: Sequence[str] | None,
    doc: str | None,
) -> int:
    """Runs a command: flags of `config_cls` from `argv`, then `job(config)`; returns its status.

    Args:
      prog: the program name for `prog: error: ...` lines.
      config_cls: the command's settings dataclass (fields declared with `option`).
      job: runs the command with the checked config (and prints its results).
      argv: the command line; argv[0] is the program (None: sys.argv, for console scripts).
      doc: printed above the flags by --help.

    Returns:
      0, 1 (the run failed) or 2 (bad command line).
    """
    argv = sys.argv if argv is None else argv
    backend = keras_backend()
    if backend != "tensorflow":
        print(
            f"{prog}: error: Keras runs on {backend}; boneage_tpu needs TensorFlow: unset "
            "KERAS_BACKEND or set KERAS_BACKEND=tensorflow",
            file=sys.stderr,
        )
        return 1
    flag_values = flags.FlagValues()
    define_flags(config_cls, flag_values)
    takes_positional = any(f.metadata["positional"] for f in flag_fields(config_cls))
    rest, status = parse_flags(prog, flag_values, argv, doc, positional=takes_positional)
    if status is not None:
        return status
    try:
        job(config_from_flags(config_cls, flag_values, rest))
    except UsageError as e:
        print(f"{prog}: error: {_failure_line(e)}", file=sys.stderr)
        return 2
    except _run_errors() as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(f"{prog}: error: {_failure_line(e)}", file=sys.stderr)
        return 1
    return 0
