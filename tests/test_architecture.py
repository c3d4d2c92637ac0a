"""Tests of the package's structure: the import graph and every command's command line."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pathlib

import pytest

from boneage_tpu import UsageError, cli
from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "boneage_tpu"

# (program name, command module with `main(argv)`, its config class, valid required flags).
COMMANDS = [
    (
        "make_phantom",
        "boneage_tpu.cli.make_phantom",
        "boneage_tpu.phantom.job:PhantomConfig",
        ["--output=OUT"],
    ),
    (
        "make_tfrecords",
        "boneage_tpu.cli.make_tfrecords",
        "boneage_tpu.convert.job:ConvertConfig",
        ["--labels=x.csv", "--images=img", "--output=OUT"],
    ),
    (
        "train",
        "boneage_tpu.cli.train",
        "boneage_tpu.core.config:TrainConfig",
        ["--data=DATA", "--model_dir=OUT"],
    ),
    (
        "evaluate",
        "boneage_tpu.cli.evaluate",
        "boneage_tpu.evaluate.job:EvalConfig",
        ["--model_dir=M", "--data=DATA"],
    ),
    (
        "predict",
        "boneage_tpu.cli.predict",
        "boneage_tpu.predict.job:PredictConfig",
        ["--model=M", "a.png"],
    ),
    (
        "quickstart",
        "boneage_tpu.cli.quickstart",
        "boneage_tpu.quickstart.job:QuickstartConfig",
        ["--output=OUT"],
    ),
]
# A library module longer than this says why in its docstring (a sentence with "lines");
# a command module (cli/<command>.py) is never longer than COMMAND_LINES.
LIBRARY_LINES = 400
COMMAND_LINES = 100


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Returns module -> the package modules it imports (lazy imports in functions included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from pkg import mod` imports pkg.mod when that is a module, else pkg itself.
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """Returns one import cycle as [a, b, ..., a], or [] when the graph has none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return [*stack[stack.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert {"boneage_tpu.evaluate.once", "boneage_tpu.train.job", "boneage_tpu.cli.train"} <= set(
        graph
    )
    assert "boneage_tpu.evaluate.once" in graph["boneage_tpu.evaluate.continuous"]
    assert find_cycle(graph) == []


# The package's layers, bottom first: a module imports its own package and lower layers only.
# "" is `boneage_tpu/__init__.py`; "cli" here is the runner, `boneage_tpu/cli/__init__.py`;
# `verify/` holds only the `python -m boneage_tpu.verify` entry point.
LAYERS = [
    {"", "core", "cli"},
    {"data"},
    {"modeling"},
    {"inference"},
    {"phantom", "convert", "train", "evaluate", "predict"},
    {"quickstart", "verify"},
]


def _layer(module: str) -> tuple[str, int]:
    if _is_command(module):
        return "commands", len(LAYERS)
    package = module.split(".")[1] if module.count(".") else ""
    return package, next(i for i, layer in enumerate(LAYERS) if package in layer)


def _is_command(module: str) -> bool:
    return module.startswith("boneage_tpu.cli.")


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set().union(*LAYERS), packages - set().union(*LAYERS)


def test_layers_import_only_downwards():
    """The rules of docs/architecture.md: the package never imports tools, and every import
    goes to the module's own package or to a lower layer (the bottom one is one layer)."""
    graph = import_graph()
    for name, edges in graph.items():
        assert not any(e.startswith("tools") for e in edges), name
        if name.endswith("__main__"):
            continue  # `python -m` entry points: they only run a command.
        package, rank = _layer(name)
        for edge in edges:
            other, other_rank = _layer(edge)
            assert other == package or other_rank < rank or rank == other_rank == 0, (name, edge)


def test_nothing_imports_a_command():
    """Commands (cli/<command>.py) import libraries; only `python -m` entry points import them."""
    graph = import_graph()
    commands = {name for name in graph if _is_command(name)}
    assert {c.rsplit(".", 1)[1] for c in commands} >= {c[0] for c in COMMANDS}
    for name, edges in graph.items():
        if not name.endswith("__main__"):
            assert not edges & commands, (name, edges & commands)


def test_modules_are_short_or_say_why():
    for path in PACKAGE.rglob("*.py"):
        name, lines = _module_name(path), len(path.read_text().splitlines())
        if _is_command(name):
            assert lines <= COMMAND_LINES, (name, lines)
        elif lines > LIBRARY_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert " lines" in doc, f"{name}: {lines} lines and no reason in its docstring"


def _config_class(module: str, class_path: str) -> type:
    del module
    module_name, class_name = class_path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


@pytest.mark.parametrize(("prog", "module", "class_name", "required"), COMMANDS)
def test_help_lists_every_flag_of_the_config_class(capsys, prog, module, class_name, required):
    main = importlib.import_module(module).main
    assert main([prog, "--help"]) == 0
    out = capsys.readouterr().out
    fields = cli.flag_fields(_config_class(module, class_name))
    assert fields
    for field in fields:
        if field.metadata["positional"]:
            continue
        name = cli.flag_name(field)
        assert f"--{name}" in out or f"--[no]{name}" in out, (prog, name)
        assert field.metadata["help"].split()[0] in out


def _numeric_field(config_cls: type) -> dataclasses.Field:
    return next(
        f
        for f in cli.flag_fields(config_cls)
        if f.metadata["min"] is not None and f.type in ("int", "float")
    )


def test_every_numeric_flag_declares_a_valid_range():
    for _, module, class_name, _ in COMMANDS:
        config_cls = _config_class(module, class_name)
        for field in cli.flag_fields(config_cls):
            numeric = any(t in str(field.type) for t in ("int", "float"))
            if numeric:
                assert field.metadata["min"] is not None, (config_cls.__name__, field.name)
                assert field.metadata["max"] is not None, (config_cls.__name__, field.name)


@pytest.mark.parametrize(("prog", "module", "class_name", "required"), COMMANDS)
def test_bad_flags_and_values_are_one_line_usage_errors(
    tmp_path, capsys, prog, module, class_name, required
):
    main = importlib.import_module(module).main
    required = [a.replace("OUT", str(tmp_path / "out")) for a in required]
    numeric = _numeric_field(_config_class(module, class_name))
    name, low = cli.flag_name(numeric), numeric.metadata["min"]
    cases = [
        (["--no_such_flag=1"], "no_such_flag"),
        ([f"--{name}=not-a-number"], name),
        ([f"--{name}={low - 1}"], f"--{name} must be >= {low}"),
        ([f"--{name}={numeric.metadata['max'] * 10 + 1}"], f"--{name} must be <="),
    ]
    for extra, message in cases:
        assert main([prog, *required, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and message in err[0], err
        assert not (tmp_path / "out").exists()


def test_missing_required_flags_are_named_on_one_line(capsys):
    from boneage_tpu.cli import make_tfrecords as job

    assert job.main(["make_tfrecords", "--labels=x.csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["make_tfrecords: error: missing required flag(s): --images, --output"]


def test_list_flags_take_comma_separated_numbers_with_one_line_errors():
    from absl import flags

    from boneage_tpu.core.config import TrainConfig

    values = flags.FlagValues()
    cli.define_flags(TrainConfig, values)
    values(["train", "--data=d", "--model_dir=m", "--dense_units=64,x"])
    with pytest.raises(UsageError, match="--dense_units must be a comma-separated list"):
        cli.config_from_flags(TrainConfig, values)
    values(["train", "--data=d", "--model_dir=m", "--dense_units=64,0"])
    with pytest.raises(UsageError, match="--dense_units must be >= 1, got 0"):
        cli.config_from_flags(TrainConfig, values)
