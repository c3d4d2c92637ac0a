"""Every command's command line: flags declared by a config dataclass, one error path.

A command's settings are one dataclass whose fields declare their flag with `option(...)`:
help text, choices, the valid range of a number, whether it is required. `define_flags`
turns the class into absl flags, `config_from_flags` builds (and checks) the config from the
parsed flags, and `main` runs a command with both:

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
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from boneage_tpu.core import guard
from boneage_tpu.core.errors import Error, UsageError

HELP_ARGS = ("-h", "-help", "--help", "--helpfull", "--helpshort")


def option(
    default: Any,
    help: str,  # noqa: A002 - the word absl uses
    *,
    choices: Sequence[str] = (),
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    required: bool = False,
    flag: str = "",
    positional: bool = False,
    comma_list: bool = False,
) -> Any:
    """Declares a config field that is a command-line flag.

    Args:
      default: the field's default (and the flag's).
      help: the flag's help text.
      choices: the allowed values of a string setting.
      min: smallest valid value of a number (inclusive).
      max: largest valid value of a number (inclusive).
      required: the flag must be given a non-empty value.
      flag: the flag's name when it differs from the field's.
      positional: the field takes the command's positional arguments instead of a flag.
      comma_list: a `tuple[str, ...]` field takes one comma-separated value (`--x a,b`)
        instead of a repeated flag; with `choices`, each item must be one of them.

    Returns:
      A `dataclasses.field`.
    """
    metadata = {
        "help": help,
        "choices": tuple(choices),
        "min": min,
        "max": max,
        "required": required,
        "flag": flag,
        "positional": positional,
        "comma_list": comma_list,
    }
    return dataclasses.field(default=default, metadata=metadata)


def flag_fields(config_cls: type) -> list[dataclasses.Field]:
    """Returns the fields of `config_cls` declared with `option` (the others are not flags)."""
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata]


def flag_name(field: dataclasses.Field) -> str:
    """Returns the command-line name of a field."""
    return field.metadata["flag"] or field.name


def base_type(hint: Any) -> Any:
    """Reduces `X | None` to X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _range_text(meta: dict[str, Any]) -> str:
    low, high = meta["min"], meta["max"]
    if low is not None and high is not None:
        return f"{low}..{high}"
    return f">= {low}" if low is not None else f"<= {high}" if high is not None else ""


def define_flags(config_cls: type, flag_values: flags.FlagValues) -> None:
    """Defines one absl flag per `option` field of `config_cls`, with the field's default."""
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls()
    for field in flag_fields(config_cls):
        meta, name = field.metadata, flag_name(field)
        if meta["positional"]:
            continue
        default, kind = getattr(defaults, field.name), base_type(hints[field.name])
        text = meta["help"] + (f" Valid: {_range_text(meta)}." if _range_text(meta) else "")
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


def check(config: Any) -> None:
    """Checks every `option` field of a config against its choices and valid range.

    Raises:
      UsageError: one line naming the flag, its valid range and the value.
    """
    fields = flag_fields(type(config))
    missing = [
        f"--{flag_name(f)}"
        for f in fields
        if f.metadata["required"] and not getattr(config, f.name)
    ]
    if missing:
        raise UsageError(f"missing required flag(s): {', '.join(missing)}")
    for field in fields:
        meta, value = field.metadata, getattr(config, field.name)
        name = flag_name(field)
        # A list's choices apply to each of its items.
        items = value if isinstance(value, tuple) else (value,)
        wrong = [item for item in items if meta["choices"] and item not in meta["choices"]]
        if wrong:
            raise UsageError(
                f"--{name} must be one of {', '.join(meta['choices'])}, got {wrong[0]!r}"
            )
        for number in items:
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                continue
            low, high = meta["min"], meta["max"]
            if low is not None and number < low:
                raise UsageError(f"--{name} must be >= {low}, got {number}")
            if high is not None and number > high:
                raise UsageError(f"--{name} must be <= {high}, got {number}")


def config_from_flags(
    config_cls: type, flag_values: flags.FlagValues, positional: Sequence[str] = ()
) -> Any:
    """Returns the checked config of parsed flags (and of the positional arguments).

    Raises:
      UsageError: a value cannot be converted, is out of its range or a required one is empty.
    """
    hints = typing.get_type_hints(config_cls)
    values = {}
    for field in flag_fields(config_cls):
        kind = base_type(hints[field.name])
        if field.metadata["positional"]:
            values[field.name] = tuple(positional)
        else:
            raw = flag_values[flag_name(field)].value
            values[field.name] = _flag_value(field, kind, raw)
    config = config_cls(**values)
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
