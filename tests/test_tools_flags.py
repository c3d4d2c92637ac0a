"""The benchmarks' one flag system: a bad value is one `prog: error: ...` line and exit 2.

Every case fails in flag checking (absl's parse or `cli.check`), before any TensorFlow work.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from absl import flags

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.core.errors import UsageError

CASES = [
    ("benchmark_beam", ["--workers=-1"], "--workers must be >= 0, got -1"),
    ("benchmark_beam", ["--image_size=0"], "--image_size must be >= 1, got 0"),
    ("benchmark_convert", ["--encoding=gif"], "--encoding"),
    ("benchmark_convert", ["--repeat=0"], "--repeat must be >= 1, got 0"),
    ("benchmark_input", [], "missing required flag(s): --labels, --images"),
    ("benchmark_input", ["--labels=l", "--images=i", "--replicate=0"], "--replicate must be >= 1"),
    ("benchmark_predict", ["--small=0"], "--small must be >= 1, got 0"),
    ("benchmark_predict", ["--large=many"], "--large"),
    ("benchmark_train", ["--data=d", "--precisions=fp32,fp64"], "--precisions must be one of"),
    ("benchmark_train", ["--data=d", "--steps=0"], "--steps must be >= 1, got 0"),
    ("benchmark_warp", ["--methods=gather,bilinear"], "got 'bilinear'"),
    ("benchmark_warp", ["--sizes=128,big"], "--sizes must be a comma-separated list of ints"),
    ("benchmark_warp", ["--sizes=8"], "--sizes must be >= 16, got 8"),
    ("benchmark_warp", ["--xla=maybe"], "--xla"),
    ("benchmark_warp", ["--no_such_flag=1"], "no_such_flag"),
]


@pytest.mark.parametrize(("tool", "argv", "message"), CASES)
def test_a_bad_value_is_one_line_and_exit_2(capsys, tool, argv, message):
    module = importlib.import_module(f"tools.{tool}")
    assert module.main([tool, *argv]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"{tool}: error: "), captured.err
    assert message in captured.err
    assert not captured.out


@dataclasses.dataclass
class _Listed:
    """A comma-separated list with per-item choices, and a repeated one."""

    modes: tuple[str, ...] = option(("a",), "Modes.", choices=("a", "b"), comma_list=True)
    names: tuple[str, ...] = option((), "Names.")


def test_comma_list_takes_one_value_and_checks_each_item():
    values = flags.FlagValues()
    cli.define_flags(_Listed, values)
    assert "Each one of: a, b." in values.get_help()
    values(["prog", "--modes=b,a", "--names=x,y"])
    config = cli.config_from_flags(_Listed, values)
    # The comma list is split; a repeated-flag list keeps its one value whole.
    assert config.modes == ("b", "a") and config.names == ("x,y",)
    values(["prog", "--modes=a,c"])
    with pytest.raises(UsageError, match=r"^--modes must be one of a, b, got 'c'$"):
        cli.config_from_flags(_Listed, values)
