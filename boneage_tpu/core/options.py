"""Settings dataclasses whose fields declare their command-line flags, and building them.

A command's settings are one dataclass whose fields declare their flag with `option(...)`:
help text, choices, the valid range of a number, whether it is required. A field declared
with `group(SubConfig)` holds a nested settings dataclass whose flags join the command's
(flag names stay flat and unique: `--learning_rate` sets `config.optim.learning_rate`).
`flags_of` lists a class's flags, `from_flat`/`flat`/`replace` build, list and change a config
by flag names, and `check` holds a config to its flags' choices and ranges. The absl side
(defining and parsing the flags, running a command) is `boneage_tpu.cli`'s.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from boneage_tpu.core.errors import UsageError


def option(
    default: Any,
    help: str,  # noqa: A002 - the word absl uses
    *,
    choices: Sequence[str] = (),
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    required: bool = False,
    flag: str = "",
    aliases: Sequence[str] = (),
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
      aliases: other names the flag also answers to (older spellings).
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
        "aliases": tuple(aliases),
        "positional": positional,
        "comma_list": comma_list,
    }
    return dataclasses.field(default=default, metadata=metadata)


def group(config_cls: type) -> Any:
    """Declares a config field that holds a nested settings dataclass (a group of flags).

    Args:
      config_cls: the group's dataclass; its `option` fields become flags of the command.

    Returns:
      A `dataclasses.field` defaulting to `config_cls()`.
    """
    return dataclasses.field(default_factory=config_cls, metadata={"group": True})


@dataclasses.dataclass(frozen=True)
class Flag:
    """One `option` field of a (possibly nested) config class.

    Attributes:
      path: attribute names from the top config to the field (`("optim", "learning_rate")`).
      field: the dataclass field (its metadata holds help, choices and range).
      kind: the field's type, `X | None` reduced to X.
    """

    path: tuple[str, ...]
    field: dataclasses.Field
    kind: Any

    @property
    def name(self) -> str:
        """The command-line name."""
        return flag_name(self.field)

    def get(self, config: Any) -> Any:
        """Returns this field's value in `config` (an instance of the top class)."""
        for name in self.path:
            config = getattr(config, name)
        return config


def flags_of(config_cls: type) -> list[Flag]:
    """Returns every `option` field of `config_cls` and of its groups, in declaration order.

    Raises:
      TypeError: two fields declare the same flag name (a bug in the config classes).
    """
    found: list[Flag] = []

    def visit(cls: type, path: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.metadata.get("group"):
                visit(hints[field.name], (*path, field.name))
            elif "help" in field.metadata:
                found.append(Flag((*path, field.name), field, base_type(hints[field.name])))

    visit(config_cls, ())
    names = [f.name for f in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TypeError(f"{config_cls.__name__}: flag names declared twice: {repeated}")
    return found


def flag_fields(config_cls: type) -> list[dataclasses.Field]:
    """Returns the fields declared with `option`, groups included (the others are not flags)."""
    return [f.field for f in flags_of(config_cls)]


def flag_name(field: dataclasses.Field) -> str:
    """Returns the command-line name of a field."""
    return field.metadata["flag"] or field.name


def build(config_cls: type, value_of: Callable[[Flag], Any]) -> Any:
    """Builds `config_cls` and its groups, each flag's value from `value_of(flag)`."""
    by_path = {f.path: f for f in flags_of(config_cls)}

    def make(cls: type, path: tuple[str, ...]) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for field in dataclasses.fields(cls):
            here = (*path, field.name)
            if field.metadata.get("group"):
                kwargs[field.name] = make(hints[field.name], here)
            elif here in by_path:
                kwargs[field.name] = value_of(by_path[here])
        return cls(**kwargs)

    return make(config_cls, ())


def from_flat(
    config_cls: type, values: Mapping[str, Any] | None = None, *, required: bool = True
) -> Any:
    """Builds a config from flag names and Python values (defaults for the others), checked.

    `from_flat(TrainConfig, {"data": "d", "model_dir": "m", "learning_rate": 0.1})` is the
    config of the command line `--data=d --model_dir=m --learning_rate=0.1`.

    Args:
      config_cls: the config class (groups included).
      values: {flag name: value}; tuples may be given as lists.
      required: also refuse empty required flags (False: a partial config, e.g. to build a
        model in a test or a benchmark without data).

    Raises:
      UsageError: a name is not a flag of `config_cls`, or a value is out of its range.
    """
    values = dict(values or {})
    flags_by_name = {f.name: f for f in flags_of(config_cls)}
    unknown = sorted(set(values) - set(flags_by_name))
    if unknown:
        raise UsageError(f"unknown setting(s) of {config_cls.__name__}: {', '.join(unknown)}")
    defaults = build(config_cls, lambda f: f.field.default)

    def value_of(flag: Flag) -> Any:
        if flag.name not in values:
            return flag.get(defaults)
        value = values[flag.name]
        if typing.get_origin(flag.kind) is tuple:
            item = typing.get_args(flag.kind)[0]
            return tuple(item(v) for v in value)
        return value

    config = build(config_cls, value_of)
    check(config, required=required)
    return config


def flat(config: Any) -> dict[str, Any]:
    """Returns {flag name: value} of every `option` field of a config, groups included."""
    return {f.name: f.get(config) for f in flags_of(type(config))}


def replace(config: Any, **changes: Any) -> Any:
    """Returns a copy of a config with the named flags changed (values checked, as `from_flat`
    with required=False)."""
    return from_flat(type(config), {**flat(config), **changes}, required=False)


def base_type(hint: Any) -> Any:
    """Reduces `X | None` to X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def range_text(meta: dict[str, Any]) -> str:
    """Returns "min..max", ">= min" or "<= max" of a number option ("" without bounds)."""
    low, high = meta["min"], meta["max"]
    if low is not None and high is not None:
        return f"{low}..{high}"
    return f">= {low}" if low is not None else f"<= {high}" if high is not None else ""


def check(config: Any, *, required: bool = True) -> None:
    """Checks every `option` field of a config (and its groups) against its choices and range.

    Args:
      config: the config to check.
      required: also check that the required flags are not empty.

    Raises:
      UsageError: one line naming the flag, its valid range and the value.
    """
    fields = flags_of(type(config))
    missing = [f"--{f.name}" for f in fields if f.field.metadata["required"] and not f.get(config)]
    if missing and required:
        raise UsageError(f"missing required flag(s): {', '.join(missing)}")
    for flag in fields:
        meta, value, name = flag.field.metadata, flag.get(config), flag.name
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
