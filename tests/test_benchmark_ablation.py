"""Tests of tools.benchmark_ablation: options, every row's overrides against the trainer's
flags, the size and summary maths, the table, and a slow end-to-end run on phantom data."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
from absl import flags

from boneage_tpu import cli
from boneage_tpu.core.config import TrainConfig
from boneage_tpu.core.errors import UsageError
from tests.helpers import phantom_command
from tools import benchmark_ablation as ablation
from tools import benchmark_real

REPO = pathlib.Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv: list[str]) -> str:
    assert ablation.main(["benchmark_ablation", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("benchmark_ablation: error: "), err
    return err


def test_argument_errors_are_one_line(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,boneage,male\n")
    base = ["--labels", str(labels), "--images", str(tmp_path), "--output", str(tmp_path / "o")]
    assert "--labels" in _one_line_error(capsys, [])
    assert "unknown --rows nope" in _one_line_error(capsys, [*base, "--rows", "recipe,nope"])
    assert "--seeds must be" in _one_line_error(capsys, [*base, "--seeds", "0,x"])
    assert "--seeds is empty" in _one_line_error(capsys, [*base, "--seeds", ","])
    assert "none.flags not found" in _one_line_error(
        capsys, [*base, "--flagfile", str(tmp_path / "none.flags")]
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", list(ablation.ROWS))
def test_every_row_is_a_valid_trainer_command_line(name):
    # A typo in an override would only show after hours of the rows before it.
    fv = flags.FlagValues()
    cli.define_flags(TrainConfig, fv)
    argv = ["train", "--flagfile", str(REPO / "configs/rsna_cpu.flags"), *ablation.ROWS[name][1]]
    _, status = cli.parse_flags("train", fv, [*argv, "--data=d", "--model_dir=m"], None)
    assert status is None
    config = cli.flat(cli.config_from_flags(TrainConfig, fv))
    recipe = {"head": "bins", "input_norm": "zscore", "use_sex": True, "augment": True}
    changed = {k for k, v in recipe.items() if config[k] != v}
    expected = {
        "head_regression": {"head"},
        "input_norm_none": {"input_norm"},
        "no_sex": {"use_sex"},
        "no_augment": {"augment"},
    }
    assert changed == expected.get(name, set())
    assert (config["balance"] == "age_sex") == (name == "balance_age_sex")
    assert config["image_size"] == {"size_160": 160, "size_192": 192}.get(name, 128)


def test_sizes_keep_the_recipes_stored_to_trained_ratio():
    assert ablation.row_image_size(["--head=bins", "--image_size=192"], 128) == 192
    assert ablation.row_image_size([], 128) == 128
    assert ablation.stored_size(128, 128, 160) == 160
    assert ablation.stored_size(160, 128, 160) == 200
    assert ablation.stored_size(192, 128, 160) == 240


def test_summary_and_table():
    runs = [{"val_mae_months": 9.0, "steps": 100}, {"val_mae_months": 10.0, "steps": 110}]
    assert ablation.summarise(runs, "val_mae_months") == {"mean": 9.5, "spread": 1.0}
    assert ablation.summarise(runs, "missing") == {"mean": None, "spread": None}
    none = {"mean": None, "spread": None}

    def row(change, mae, ratio, **extra):
        return {
            "change": change,
            "runs": [{}, {}],
            "val_mae_months": {"mean": mae, "spread": 0.4},
            "worst_shift_ratio": {"mean": ratio, "spread": 0.0},
            "steps": {"mean": 100.0, "spread": 0.0},
            "val_mae_tta_months": none,
            "val_mae_corrected_months": none,
            "val_mae_tta_corrected_months": none,
            **extra,
        }

    result = {
        "rows": {
            "recipe": row("as is", 9.5, 1.05, val_mae_tta_months={"mean": 9.0, "spread": 0.2}),
            "no_sex": row("no sex input", 11.0, 1.1),
        }
    }
    lines = ablation.markdown_table(result).splitlines()
    assert lines[2] == "| recipe | as is | 9.50 ± 0.20 | +0.00 | 1.05 ± 0.00 | 100 | 2 |"
    assert (
        lines[3].startswith("| recipe + rotflip TTA | ") and "| 9.00 ± 0.10 | -0.50 |" in lines[3]
    )
    assert lines[4] == "| no_sex | no sex input | 11.00 ± 0.20 | +1.50 | 1.10 ± 0.00 | 100 | 2 |"
    assert len(lines) == 5


def test_parse_seeds():
    assert ablation.parse_seeds("0, 1") == [0, 1]
    with pytest.raises(UsageError):
        ablation.parse_seeds("-1")


@pytest.mark.slow
def test_end_to_end_on_phantom_resumes_finished_rows(tmp_path):
    cmd = phantom_command("tools.benchmark_ablation", tmp_path, tmp_path / "a")
    cmd += ["--minutes", "0.1", "--rows", "recipe,no_sex"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "a" / "ablation.json").read_text())
    assert result["row_order"] == ["recipe", "no_sex"] and set(result["rows"]) == {
        "recipe",
        "no_sex",
    }
    recipe = result["rows"]["recipe"]["runs"][0]
    for key in ("val_mae_months", "val_mae_tta_months", "worst_shift_ratio"):
        assert recipe[key] > 0, key
    assert set(recipe["shift_ratios"]) == set(benchmark_real.TRANSFORMS)
    assert "| no_sex | no sex input |" in done.stdout
    trained = [c for c in result["commands"] if "boneage_tpu.train" in c]
    assert len(trained) == 2 and all("--max_train_minutes 0.1" in c for c in trained)
    assert "--nouse_sex" in trained[1] and "--nouse_sex" not in trained[0]
    # A second run reuses the finished model: evaluations only.
    cmd[cmd.index("recipe,no_sex")] = "recipe"
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    result = json.loads((tmp_path / "a" / "ablation.json").read_text())
    assert not [c for c in result["commands"] if "boneage_tpu.train" in c]
    assert "reusing the finished model" in again.stdout
