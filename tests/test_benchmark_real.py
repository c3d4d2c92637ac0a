"""Tests of tools.benchmark_real: options, the export-window transforms, record and curve
maths, the JSON (subprocesses mocked, the trainer's metrics.jsonl hand-made), and a slow
end-to-end run on phantom data."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import subprocess

import numpy as np
import pytest
from PIL import Image

from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import schema
from boneage_tpu.core.config import AugmentConfig, TrainConfig
from boneage_tpu.core.errors import UsageError
from tests.conftest import requires_tf_keras
from tests.helpers import TINY_FLAGS, config_and_derived, phantom_command
from tools import benchmark_real, benchmark_real_seed

REPO = pathlib.Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {
    "val_mae_months",
    "val_mae_tta_months",
    "val_mae_corrected_months",
    "mean_predictor_mae_months",
    "mae_by_sex",
    "train_minutes",
    "train_minutes_excluding_validation",
    "train_img_s",
    "train_img_s_method",
    "model_dir",
    "robustness",
    "load_average",
    "load_flagged",
    "commands",
    "notes",
}


def _one_line_error(capsys, argv: list[str], status: int) -> str:
    assert benchmark_real.main(["benchmark_real", *argv]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("benchmark_real: error: "), err
    return err


def _inputs(tmp_path) -> tuple[list[str], str]:
    """An empty labels CSV and a tiny recipe: returns (--labels/--images/--output, flagfile)."""
    labels = tmp_path / "labels.csv"
    labels.write_text("id,boneage,male\n")
    flagfile = tmp_path / "r.flags"
    flagfile.write_text(TINY_FLAGS)
    base = ["--labels", str(labels), "--images", str(tmp_path), "--output", str(tmp_path / "o")]
    return base, str(flagfile)


def test_argument_errors_are_one_line(tmp_path, capsys):
    base, flagfile = _inputs(tmp_path)
    assert "--output" in _one_line_error(capsys, [], 2)
    err = _one_line_error(capsys, ["--output", str(tmp_path / "o")], 2)
    assert "--labels and --images are required (or --model_dir" in err
    run = ["--output", str(tmp_path / "o"), "--model_dir", str(tmp_path)]
    assert "give --test_labels" in _one_line_error(capsys, run, 2)
    with_test = [*run, "--test_labels", base[1], "--test_images", str(tmp_path)]
    assert "drop --labels" in _one_line_error(capsys, [*with_test, "--labels", base[1]], 2)
    assert "--flagfile needs a value" in _one_line_error(capsys, [*base, "--flagfile"], 2)
    err = _one_line_error(capsys, [*base, "--flagfile", str(tmp_path / "none.flags")], 2)
    assert "none.flags not found" in err
    err = _one_line_error(
        capsys, [*base, f"--flagfile={flagfile}", "--test_labels", str(tmp_path / "labels.csv")], 2
    )
    assert "--test_labels and --test_images go together" in err
    err = _one_line_error(capsys, [*base, f"--flagfile={flagfile}", "--minutes", "0"], 2)
    assert "--minutes must be > 0" in err
    err = _one_line_error(capsys, [*base, f"--flagfile={flagfile}", "--seed", "-1"], 2)
    assert "--seed must be >= 0" in err
    err = _one_line_error(capsys, [*base, "--flagfile", flagfile, "--images", "/nonexistent"], 2)
    assert "is not a folder" in err
    assert not (tmp_path / "o").exists()


def test_seed_pipeline_takes_the_trainer_flags_and_the_flagfile(tmp_path, capsys):
    assert benchmark_real_seed.main(["benchmark_real_seed"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "benchmark_real_seed: error: missing required flag(s): --model_dir, --data"
    )
    flagfile = tmp_path / "r.flags"
    flagfile.write_text(TINY_FLAGS)
    argv = ["benchmark_real_seed", f"--flagfile={flagfile}", "--data=d", "--model_dir=m"]
    argv += ["--train_csv=t.csv", "--val_csv=v.csv", "--curve=c.json"]
    # The recipe's values reach the seed's TrainConfig; flags after the flagfile override.
    assert benchmark_real_seed.main([*argv, "--image_size=7"]) == 2
    assert "--image_size must be >= 8, got 7" in capsys.readouterr().err
    assert benchmark_real_seed.main([*argv, "--max_train_minutes=0"]) == 2
    assert "--max_train_minutes must be > 0" in capsys.readouterr().err


def test_the_recipe_is_read_with_the_trainers_flags(tmp_path):
    path = tmp_path / "r.flags"
    path.write_text(TINY_FLAGS + "--eval_every=7\n--use_sex\n")
    values = benchmark_real.recipe_flags(str(path))
    assert values["image_size"].value == 40 and values["eval_every"].value == 7
    assert values["attention"].value is False and values["use_sex"].value is True
    # What the file leaves out is the trainer's default.
    assert values["weights"].value == TrainConfig().model.weights
    path.write_text("--image_size=big\n")
    with pytest.raises(benchmark_real.BenchError, match="image_size"):
        benchmark_real.recipe_flags(str(path))
    path.write_text("--no_such_flag=1\n")
    with pytest.raises(benchmark_real.BenchError, match="no_such_flag"):
        benchmark_real.recipe_flags(str(path))
    with pytest.raises(benchmark_real.BenchError, match="not found"):
        benchmark_real.recipe_flags(str(tmp_path / "none.flags"))


def test_contrast_half_halves_the_spread_about_the_mean():
    image = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    out = benchmark_real.contrast_half(image).astype(np.float64)
    assert out.mean() == pytest.approx(image.mean(), abs=0.5)
    assert out.std() == pytest.approx(0.5 * image.std(), rel=0.01)


def test_gamma_maps_mid_tones_as_the_formula():
    image = np.array([[0, 64, 128, 255]], np.uint8)
    bright, dark = benchmark_real.gamma(image, 0.7), benchmark_real.gamma(image, 1.4)
    assert bright[0, 0] == dark[0, 0] == 0 and bright[0, 3] == dark[0, 3] == 255
    assert bright[0, 1] == round(255 * (64 / 255) ** 0.7) > 64
    assert dark[0, 2] == round(255 * (128 / 255) ** 1.4) < 128


def test_window_maps_the_1st_and_99th_percentiles_to_20_and_100():
    image = np.random.default_rng(1).integers(0, 256, (200, 200)).astype(np.uint8)
    out = benchmark_real.window_20_100(image).astype(np.float64)
    low, high = np.percentile(out, [1.0, 99.0])
    assert low == pytest.approx(20.0, abs=1.0) and high == pytest.approx(100.0, abs=1.0)
    assert out.min() >= 0 and out.max() <= 255
    assert np.all(benchmark_real.window_20_100(np.full((8, 8), 77, np.uint8)) == 20)


def test_the_seed_side_recalibrates_batch_norm_without_touching_the_weights():
    from boneage_tpu.modeling.model import build_model
    from boneage_tpu.train import loop

    model = build_model(
        *config_and_derived(backbone="tiny", image_size=32, label_std=40.0, label_mean=100.0)
    )
    statistics = loop.moving_statistics(model)
    assert statistics, "the tiny backbone has batch norm"
    before = [v.numpy() for v in statistics]
    weights = [v.numpy() for v in model.trainable_variables]
    rng = np.random.default_rng(0)
    drawn = []

    def next_inputs() -> dict[str, np.ndarray]:
        drawn.append(1)
        image = rng.uniform(100, 200, (4, 32, 32, 1)).astype(np.float32)
        return {"image": image, "male": np.ones([4], np.float32)}

    benchmark_real_seed.batch_norm_recalibration(model, next_inputs, 3)()
    assert len(drawn) == 3
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(before, statistics, strict=True))
    for a, v in zip(weights, model.trainable_variables, strict=True):
        assert np.array_equal(a, v.numpy())


def _trainer_records(val_seconds: float) -> list[dict]:
    """A hand-made metrics.jsonl: 3 loops of 10 steps (batch 4), validations after 2 and 3."""

    def record(kind: str, step: int, seconds: float, **values) -> dict:
        return {"kind": kind, "step": step, "seconds": seconds, "time": 1.8e9 + seconds, **values}

    def train(step: int, seconds: float, rate: float) -> dict:
        return record("train", step, seconds, loss=0.9, mae_months=30.0, images_per_second=rate)

    return [
        record("start", 0, 0.0, train_steps=50, batch_size=4),
        train(10, 10.0, 4.0),
        train(20, 12.0, 20.0),
        record("val", 20, 12.0 + val_seconds, mae_months=21.5, loss=0.7, count=10),
        train(30, 14.0 + val_seconds, 20.0),
        record("val", 30, 14.0 + 2 * val_seconds, mae_months=19.25, loss=0.6, count=10),
        record("stop", 30, 14.0 + 2 * val_seconds, reason="time_budget", minutes=1.2),
    ]


def write_records(model_dir: pathlib.Path, records: list[dict]) -> None:
    """Writes records where the trainer writes them (`model_dir.metrics_path`)."""
    path = pathlib.Path(model_dir_lib.metrics_path(str(model_dir)))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_trainer_records_exclude_validation_time(tmp_path):
    info = benchmark_real.summarize_training(_trainer_records(val_seconds=30.0))
    assert info["train_seconds"] == pytest.approx(14.0)
    assert info["wall_seconds"] == pytest.approx(14.0 + 30.0)
    assert info["budget_stop_minutes"] == 1.2
    assert info["images_per_second"] == pytest.approx(30 * 4 / 14.0)
    assert info["logged_img_s_median"] == 20.0
    assert info["curve"] == [[pytest.approx(12 / 60), 21.5], [pytest.approx(14 / 60), 19.25]]
    assert info["final_step"] == 30 and info["train_steps"] == 50 and info["batch_size"] == 4
    assert info["stopped_on_time_budget"]
    # After a resume only the last process counts, its seconds from its own start record.
    resumed = [
        {"kind": "start", "step": 0, "seconds": 0.0, "train_steps": 50, "batch_size": 4},
        {"kind": "train", "step": 10, "seconds": 99.0, "images_per_second": 1.0},
        {"kind": "start", "step": 10, "seconds": 1.0, "train_steps": 50, "batch_size": 4},
        {"kind": "train", "step": 20, "seconds": 5.0, "images_per_second": 10.0},
    ]
    info = benchmark_real.summarize_training(resumed)
    assert info["start_step"] == 10 and info["final_step"] == 20
    assert info["train_seconds"] == pytest.approx(4.0) and not info["stopped_on_time_budget"]
    with pytest.raises(benchmark_real.BenchError, match="no start or train records"):
        benchmark_real.read_training(tmp_path)  # no metrics.jsonl: the trainer failed early
    write_records(tmp_path, _trainer_records(val_seconds=1.0))
    assert benchmark_real.read_training(tmp_path)["final_step"] == 30
    (tmp_path / "metrics.jsonl").write_text("garbage\n{}\n")
    with pytest.raises(benchmark_real.BenchError, match="line 1 is not valid JSON"):
        benchmark_real.read_training(tmp_path)


def test_time_to_accuracy_is_final_against_final_on_hand_made_curves():
    # The seed reaches its final 15.0 first at 50 min (a dip), then ends at 60 min.
    seed = [[10.0, 30.0], [30.0, 20.0], [50.0, 14.5], [60.0, 15.0]]
    ours = [[5.0, 25.0], [12.0, 16.0], [18.0, 14.9], [40.0, 10.0], [45.0, 11.0]]
    result = benchmark_real.compare_curves(ours, seed)
    assert result["seed_final_mae_months"] == 15.0 and result["ours_final_mae_months"] == 11.0
    assert result["seed_train_minutes"] == 60.0 and result["ours_train_minutes"] == 45.0
    # Each side's time to a target is its first validation at or below it, its own final too.
    assert result["ours_minutes_to_seed_final"] == 18.0 and result["seed_minutes"] == 50.0
    assert result["ours_minutes"] == 40.0
    assert result["time_to_seed_final_ratio"] == pytest.approx(18.0 / 50.0)
    # The seed never reached our final 11.0: the mirror ratio is null, with the reason.
    assert result["seed_minutes_to_ours_final"] is None
    assert result["seed_time_to_ours_final_ratio"] is None
    assert "the seed's pipeline never reached our final val MAE 11.00" in result["reason"]
    assert "(its best was 14.50)" in result["reason"]
    never = benchmark_real.compare_curves([[5.0, 25.0], [40.0, 15.5]], seed)
    assert never["time_to_seed_final_ratio"] is None and never["ours_minutes_to_seed_final"] is None
    assert (
        "our trainer never reached the seed's final val MAE 15.00 (its best was 15.50)"
        in (never["reason"])
    )
    assert never["seed_minutes_to_ours_final"] == 50.0
    assert never["seed_time_to_ours_final_ratio"] == pytest.approx(50.0 / 40.0)
    empty = benchmark_real.compare_curves([], seed)
    assert empty["time_to_seed_final_ratio"] is None and empty["reason"] == "a curve is empty"
    assert benchmark_real.time_to_reach(ours, 14.9) == 18.0
    assert benchmark_real.time_to_reach(ours, 9.0) is None
    assert benchmark_real.shift_curve([[1.0, 9.0]], 2.5) == [[3.5, 9.0]]


def test_a_busy_machine_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.75, 0.5, 0.25))
    with pytest.raises(UsageError, match="load average is 0.75 \\(> 0.5\\)"):
        benchmark_real.check_load(False)
    assert benchmark_real.check_load(True) == ([0.75, 0.5, 0.25], True)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 3.0, 3.0))
    assert benchmark_real.check_load(False) == ([0.5, 3.0, 3.0], False)
    # From the command line: exit 2, one line, before anything is written.
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    labels = tmp_path / "labels.csv"
    labels.write_text("id,boneage,male\n")
    flagfile = tmp_path / "r.flags"
    flagfile.write_text(TINY_FLAGS)
    argv = ["--labels", str(labels), "--images", str(tmp_path), "--output", str(tmp_path / "o")]
    err = _one_line_error(capsys, [*argv, "--flagfile", str(flagfile)], 2)
    assert "--allow_load" in err and not (tmp_path / "o").exists()


def test_seed_images_need_the_comparison_and_a_fresh_conversion(tmp_path, capsys):
    base, flagfile = _inputs(tmp_path)
    base += ["--flagfile", flagfile, "--seed_images", str(tmp_path)]
    assert "--seed_images needs --compare_seed" in _one_line_error(capsys, base, 2)
    err = _one_line_error(capsys, [*base, "--compare_seed", "--skip_convert"], 2)
    assert "drop --data/--skip_convert" in err
    base[-1] = str(tmp_path / "none")
    assert "is not a folder" in _one_line_error(capsys, [*base, "--compare_seed"], 2)


def test_the_seed_augmentation_is_the_recipes_ranges():
    augment = AugmentConfig(
        rotation_deg=15.0, shift=0.1, zoom=(0.8, 1.25), shear=0.1, flip=True, brightness=0.15,
        contrast=(0.5, 1.5), gamma=(0.6, 1.6),
    )  # fmt: skip
    kwargs = benchmark_real_seed.seed_augmentation(augment)
    assert kwargs["rotation_range"] == 15.0
    assert kwargs["width_shift_range"] == kwargs["height_shift_range"] == 0.1
    # Keras' zoom z shows 1/z of the side: our scales 0.8..1.25 are its 1/1.25..1/0.8.
    assert kwargs["zoom_range"] == [pytest.approx(0.8), pytest.approx(1.25)]
    assert kwargs["shear_range"] == pytest.approx(math.degrees(math.atan(0.1)))
    assert kwargs["horizontal_flip"] is True
    assert kwargs["channel_shift_range"] == pytest.approx(0.15 * 255)
    assert kwargs["fill_mode"] == "constant" and kwargs["cval"] == 0.0
    assert "brightness_range" not in kwargs  # multiplicative: not our additive brightness
    left_out = benchmark_real_seed.untranslated_augmentation(augment)
    assert set(left_out) == {"aug_contrast", "aug_gamma"}
    assert "no contrast jitter" in left_out["aug_contrast"]
    # Identity intensity ranges leave nothing out; augmentation off translates to nothing.
    plain = AugmentConfig(contrast=(1.0, 1.0), gamma=(1.0, 1.0), zoom=(1.0, 1.0))
    assert benchmark_real_seed.untranslated_augmentation(plain) == {}
    assert benchmark_real_seed.seed_augmentation(plain)["zoom_range"] == [1.0, 1.0]
    off = AugmentConfig(enabled=False)
    assert benchmark_real_seed.seed_augmentation(off) == {}
    assert benchmark_real_seed.untranslated_augmentation(off) == {}
    # The arguments are ImageDataGenerator's own: it accepts them all.
    tf_keras_image = pytest.importorskip("tf_keras.preprocessing.image")
    generator = tf_keras_image.ImageDataGenerator(**kwargs)
    assert generator.zoom_range == kwargs["zoom_range"]


def test_plain_mae_is_the_uncorrected_one_when_a_correction_is_fitted():
    assert benchmark_real.plain_mae({"mae_months": 9.0}) == 9.0
    assert benchmark_real.plain_mae({"mae_months": 9.0, "mae_uncorrected_months": None}) == 9.0
    fitted = {"mae_months": 8.0, "mae_corrected_months": 8.0, "mae_uncorrected_months": 9.5}
    assert benchmark_real.plain_mae(fitted) == 9.5


def _fake_subprocesses(monkeypatch, tmp_path, val_ids):
    """Replaces every subprocess by a fake writing what the real tool writes."""
    calls = []
    maes = {"val": 10.0, "val-rotflip": 9.0, "test": 12.0, "test-rotflip": 11.0}

    def fake(args, log_path, commands):
        commands.append(" ".join(args))
        calls.append(list(args))
        module = args[1]
        value = dict(zip(args[2::2], args[3::2], strict=False))
        if module == "boneage_tpu.convert":
            out = pathlib.Path(value["--output"])
            out.mkdir(parents=True, exist_ok=True)
            manifest = {"image_size": 40, "schema_version": schema.SCHEMA_VERSION}
            manifest["rows_skipped"] = 2 if "test" in args else 0  # --split_name test
            if "--crop" in args:  # after the lone --quiet: not in `value`'s pairs
                manifest["crop"] = args[args.index("--crop") + 1]
                manifest["crop_margin"] = float(args[args.index("--crop_margin") + 1])
            (out / "manifest.json").write_text(json.dumps(manifest))
            return []
        if module == "boneage_tpu.train":
            check = {"none": {"absolute": {"level": 0.9, "coverage": 0.91}}}
            done = {"step": 30, "metrics": {"train_minutes": 0.25, "interval_check": check}}
            model_dir = pathlib.Path(value["--model_dir"])
            model_dir.mkdir(parents=True)
            (model_dir / "DONE").write_text(json.dumps(done))
            scores = {"none": {"absolute": [1.0, 2.0, 3.0]}}
            derived = {"label_std": 40.0, "interval_scores": scores}
            (model_dir / "derived.json").write_text(json.dumps(derived))
            write_records(model_dir, _trainer_records(val_seconds=5.0))
            return []
        if module == "boneage_tpu.evaluate":
            out = pathlib.Path(value["--output"])
            out.mkdir(parents=True, exist_ok=True)
            mae = maes.get(out.name, 11.0)  # every shifted set: 11 = 1.1 x the plain MAE
            metrics = {"mae_months": mae, "mean_predictor_mae_months": 33.0, "n": len(val_ids)}
            metrics["mae_by_sex"] = {"male": mae, "female": mae}
            if "--interval" in value:
                metrics["interval"] = {"level": float(value["--interval"]), "coverage": 0.88}
            (out / "metrics.json").write_text(json.dumps(metrics))
            return []
        if module == "tools.benchmark_real_seed":
            curve = {"curve": [[0.1, 30.0], [0.3, 20.0]], "steps": 12, "images_per_second": 3.0}
            curve["settings"] = {}
            pathlib.Path(value["--curve"]).write_text(json.dumps(curve))
            return []
        raise AssertionError(f"unexpected command {args}")

    monkeypatch.setattr(benchmark_real, "run_command", fake)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.25, 0.5, 1.0))  # an idle machine
    rows = [(i, 100.0 + k, k % 2 == 0) for k, i in enumerate(val_ids)]
    monkeypatch.setattr(benchmark_real, "split_records", lambda data_dir, split: rows)
    return calls


def _source_inputs(tmp_path, ids: list[str]) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Random grey JPEGs, their labels (ages 100, 101, ..., male, female, ...) and TINY_FLAGS."""
    images = tmp_path / "images"
    images.mkdir()
    rows = ["id,boneage,male"]
    for k, i in enumerate(ids):
        pixels = np.random.default_rng(int(i)).integers(0, 256, (30, 20)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(images / f"{i}.jpg")
        rows.append(f"{i},{100 + k},{k % 2 == 0}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    flagfile = tmp_path / "r.flags"
    flagfile.write_text(TINY_FLAGS)  # --image_size=40
    return images, labels, flagfile


def test_json_has_the_keys_and_the_ratios(tmp_path, monkeypatch, capsys):
    ids = ["1", "2", "3"]
    images, labels, flagfile = _source_inputs(tmp_path, ids)
    calls = _fake_subprocesses(monkeypatch, tmp_path, ids)
    json_path = tmp_path / "result.json"
    argv = ["benchmark_real", "--labels", str(labels), "--images", str(images)]
    argv += ["--output", str(tmp_path / "out"), "--flagfile", str(flagfile), "--minutes", "0.2"]
    argv += ["--json", str(json_path), "--compare_seed", "--test_labels", str(labels)]
    argv += ["--test_images", str(images)]
    assert benchmark_real.main(argv) == 0
    result = json.loads(json_path.read_text())
    out = capsys.readouterr().out
    start = 0 if out.startswith("{\n") else out.index("\n{\n") + 1
    assert json.loads(out[start:]) == result
    assert set(result) >= REQUIRED_KEYS | {"test_mae_months", "seed_comparison"}
    assert result["val_mae_months"] == 10.0 and result["val_mae_tta_months"] == 9.0
    assert result["tta"] == "rotflip" and result["test_mae_months"] == 12.0
    assert result["train_minutes"] == 0.25  # the trainer's own figure (DONE)
    assert result["train_minutes_excluding_validation"] == pytest.approx(14 / 60)
    assert result["val_mae_corrected_months"] is None
    assert any("mae_corrected_months" in n for n in result["notes"])
    assert any("stopped on the 0.2-minute budget at step 30 of 50" in n for n in result["notes"])
    assert result["stopped_on_time_budget"]
    assert set(result["robustness"]) == set(benchmark_real.TRANSFORMS)
    for entry in result["robustness"].values():
        assert entry["ratio"] == pytest.approx(1.1) and entry["within_target"]
        assert entry["interval"] == {"level": 0.9, "coverage": 0.88}
    # The run stored interval scores: every plain evaluation asks for them, TTA ones do not.
    assert result["interval_val"]["level"] == result["interval_test"]["level"] == 0.9
    assert result["interval_check"]["none"]["absolute"]["coverage"] == 0.91
    for call in (c for c in calls if c[1] == "boneage_tpu.evaluate"):
        tta = call[call.index("--tta") + 1]
        assert ("--interval" in call) == (tta == "none"), call
    comparison = result["seed_comparison"]
    assert comparison["our_curve"] == [
        [pytest.approx(12 / 60), 21.5],
        [pytest.approx(14 / 60), 19.25],
    ]
    # The seed ends at 20.0 after 0.3 min; ours is first at or below it at 14 s.
    assert comparison["time_to_seed_final_ratio"] == pytest.approx((14 / 60) / 0.3)
    assert comparison["ours_final_mae_months"] == 19.25
    assert comparison["seed_minutes_to_ours_final"] is None
    assert not comparison["our_curve_includes_convert_minutes"]
    assert result["load_flagged"] is False and result["load_average"]["before"][0] == 0.25
    # --train_steps 2000 in the recipe, no --eval_every: 10 validations.
    train = next(c for c in calls if c[1] == "boneage_tpu.train")
    assert train[train.index("--eval_every") + 1] == "200"
    assert train[train.index("--max_train_minutes") + 1] == "0.2"
    # The seed pipeline gets the same recipe: flagfile, then the same overrides.
    seed = next(c for c in calls if c[1] == "tools.benchmark_real_seed")
    for flag in ("--flagfile", "--data", "--seed", "--max_train_minutes", "--eval_every"):
        assert seed[seed.index(flag) + 1] == train[train.index(flag) + 1], flag
    # The shifted images: grey PNGs of the transformed source, one folder per transform.
    source = np.asarray(Image.open(images / "1.jpg").convert("L"))
    shifted = np.asarray(Image.open(tmp_path / "out/robustness/gamma_1.4/images/1.png"))
    assert shifted.dtype == np.uint8 and shifted.ndim == 2
    assert np.array_equal(shifted, benchmark_real.gamma(source, 1.4))
    # A second run into the same output refuses to resume the finished model.
    assert benchmark_real.main(argv) == 1
    assert "model-seed0 exists" in capsys.readouterr().err


def test_a_hand_crop_reaches_every_conversion_and_the_stored_size_is_the_margin(
    tmp_path, monkeypatch, capsys
):
    ids = ["1", "2"]
    images, labels, flagfile = _source_inputs(tmp_path, ids)
    calls = _fake_subprocesses(monkeypatch, tmp_path, ids)
    argv = ["benchmark_real", "--labels", str(labels), "--images", str(images)]
    argv += ["--output", str(tmp_path / "out"), "--flagfile", str(flagfile), "--minutes", "0.2"]
    argv += ["--crop", "hand", "--test_labels", str(labels), "--test_images", str(images)]
    assert benchmark_real.main([*argv, "--compare_seed"]) == 2
    assert "the seed's pipeline does not crop" in capsys.readouterr().err
    assert benchmark_real.main(argv) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "out" / "benchmark_real.json").read_text())
    assert result["data_crop"] == "--crop hand --crop_margin 1.15"
    converts = [c for c in calls if c[1] == "boneage_tpu.convert"]
    # The training data, four shifted sets and the test set: all cropped alike.
    assert len(converts) == 6
    for call in converts:
        assert call[call.index("--crop") + 1 :][:3] == ["hand", "--crop_margin", "1.15"], call
    # The training data is stored at 1.25 x the training size (50 px for 40).
    assert converts[0][converts[0].index("--image_size") + 1] == "50"
    # Data converted without the crop is refused for --crop hand, in one line.
    plain = tmp_path / "plain"
    plain.mkdir()
    manifest = {"image_size": 40, "schema_version": schema.SCHEMA_VERSION}
    (plain / "manifest.json").write_text(json.dumps(manifest))
    argv = [a if a != str(tmp_path / "out") else str(tmp_path / "out2") for a in argv]
    err = _one_line_error(capsys, [*argv[1:], "--data", str(plain)], 1)
    assert "was converted with --crop none" in err


def test_seed_images_are_the_input_of_both_sides(tmp_path, monkeypatch):
    images, full = tmp_path / "images", tmp_path / "fullsize" / "boneage-training-dataset"
    images.mkdir()
    full.mkdir(parents=True)
    ids = ["1", "2", "3"]
    for i in ids:
        pixels = np.random.default_rng(int(i)).integers(0, 256, (30, 20)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(images / f"{i}.jpg")
        Image.fromarray(pixels, mode="L").resize((40, 60)).save(full / f"{i}.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("id,boneage,male\n1,100,True\n2,101,False\n3,102,True\n")
    flagfile = tmp_path / "r.flags"
    flagfile.write_text(TINY_FLAGS)
    calls = _fake_subprocesses(monkeypatch, tmp_path, ids)
    seed_csv_paths = []
    fake = benchmark_real.run_command

    def with_csvs(args, log_path, commands):
        if args[1] == "tools.benchmark_real_seed":
            with open(args[args.index("--train_csv") + 1], encoding="utf-8") as f:
                seed_csv_paths.extend(row["path"] for row in csv.DictReader(f))
        return fake(args, log_path, commands)

    monkeypatch.setattr(benchmark_real, "run_command", with_csvs)
    json_path = tmp_path / "result.json"
    argv = ["benchmark_real", "--labels", str(labels), "--images", str(images)]
    argv += ["--output", str(tmp_path / "out"), "--flagfile", str(flagfile), "--minutes", "0.2"]
    argv += ["--json", str(json_path), "--compare_seed", "--seed_images", str(full.parent)]
    assert benchmark_real.main(argv) == 0
    result = json.loads(json_path.read_text())
    # The seed side's CSVs name the full-size PNGs; our conversion read them too.
    assert seed_csv_paths == [str(full / f"{i}.png") for i in ids]
    convert = next(c for c in calls if c[1] == "boneage_tpu.convert")
    assert convert[convert.index("--images") + 1] == str(full.parent)
    assert convert[convert.index("--output") + 1].endswith("data-seed-images")
    # Our clock started before the conversion: its minutes are in our curve and our budget.
    comparison = result["seed_comparison"]
    minutes = result["convert_minutes"]
    assert minutes > 0 and comparison["our_curve_includes_convert_minutes"]
    assert comparison["our_curve"][-1][0] == pytest.approx(14 / 60 + minutes)
    assert comparison["time_to_seed_final_ratio"] == pytest.approx((14 / 60 + minutes) / 0.3)
    train = next(c for c in calls if c[1] == "boneage_tpu.train")
    budgets = [float(train[i + 1]) for i, a in enumerate(train) if a == "--max_train_minutes"]
    assert budgets[-1] == pytest.approx(0.2 - minutes, abs=1e-5)
    assert result["train_budget_minutes"] == pytest.approx(0.2 - minutes)
    seed = next(c for c in calls if c[1] == "tools.benchmark_real_seed")
    assert seed[seed.index("--max_train_minutes") + 1] == "0.2"
    assert result["seed_images"] == str(full.parent)
    assert any("--seed_images" in n for n in result["notes"])


@pytest.mark.slow
@requires_tf_keras
def test_end_to_end_on_phantom_with_the_seed_comparison(tmp_path):
    json_path = tmp_path / "result.json"
    cmd = phantom_command("tools.benchmark_real", tmp_path, tmp_path / "b")
    cmd += ["--minutes", "0.3", "--json", str(json_path)]
    cmd += ["--compare_seed", "--eval_every", "50", "--allow_load"]
    # Both sides recalibrate batch norm before their validations (the recipe asks for it).
    with open(tmp_path / "tiny.flags", "a", encoding="utf-8") as f:
        f.write("--bn_recalibration_batches=2\n")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = json.loads(json_path.read_text())
    assert set(result) >= REQUIRED_KEYS | {"seed_comparison"}
    assert result["n_val"] == 6 and result["train_steps_done"] >= 5
    # The trainer stops at the first loop end past the budget, validation included.
    assert 0.3 <= result["train_minutes"] < 1.5 and result["train_img_s"] > 0
    assert result["train_minutes_excluding_validation"] <= result["train_minutes"] + 0.05
    assert all(np.isfinite(v["mae_months"]) for v in result["robustness"].values())
    comparison = result["seed_comparison"]
    assert comparison["seed_curve"] and comparison["our_curve"]
    assert comparison["seed_curve"][-1][0] > 0 and comparison["seed_steps"] >= 1
    ratios = (comparison["time_to_seed_final_ratio"], comparison["seed_time_to_ours_final_ratio"])
    assert (None in ratios) == ("reason" in comparison)
    assert comparison["bn_recalibration_batches"] == 2
    assert comparison["seed_settings"]["augmentation"]["fill_mode"] == "constant"
    assert set(comparison["seed_augmentation_untranslated"]) == {"aug_contrast", "aug_gamma"}
    assert isinstance(result["load_flagged"], bool)


def test_model_dir_evaluates_a_trained_run_on_the_test_set_without_training(tmp_path, monkeypatch):
    calls = _fake_subprocesses(monkeypatch, tmp_path, ["1", "2"])
    run = tmp_path / "run"
    run.mkdir()
    derived = {"label_std": 40.0, "data_image_size": 40}
    (run / "derived.json").write_text(json.dumps(derived))
    labels = tmp_path / "test.csv"
    labels.write_text("id,boneage,male\n1,100,True\n2,101,False\n")
    out = tmp_path / "out"
    argv = ["benchmark_real", "--model_dir", str(run), "--output", str(out)]
    argv += ["--test_labels", str(labels), "--test_images", str(tmp_path)]
    assert benchmark_real.main(argv) == 0
    result = json.loads((out / "benchmark_real.json").read_text())
    assert [c[1] for c in calls] == ["boneage_tpu.convert"] + ["boneage_tpu.evaluate"] * 2
    convert = calls[0]
    assert convert[convert.index("--image_size") + 1] == "40"  # stored like the run's data
    assert convert[convert.index("--split_name") + 1] == "test"
    assert result["test_mae_months"] == 12.0 and result["test_mae_tta_months"] == 11.0
    assert result["test_skipped"] == 2 and result["model_dir"] == str(run.resolve())
    assert result["interval_test"] is None  # the run stored no interval scores
    assert not (run / "eval").exists()  # evaluations go to OUTPUT, not into the run
