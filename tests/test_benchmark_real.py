"""Tests of tools.benchmark_real: options, the export-window transforms, record and curve
maths, the JSON (subprocesses mocked, the trainer's metrics.jsonl hand-made), and a slow
end-to-end run on phantom data."""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pytest
from PIL import Image

from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import schema
from boneage_tpu.core.config import TrainConfig
from tests.conftest import requires_tf_keras
from tests.helpers import TINY_FLAGS, phantom_command
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
    "commands",
    "notes",
}


def _one_line_error(capsys, argv: list[str], status: int) -> str:
    assert benchmark_real.main(["benchmark_real", *argv]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("benchmark_real: error: "), err
    return err


def test_argument_errors_are_one_line(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,boneage,male\n")
    flagfile = tmp_path / "r.flags"
    flagfile.write_text(TINY_FLAGS)
    base = ["--labels", str(labels), "--images", str(tmp_path), "--output", str(tmp_path / "o")]
    assert "--labels" in _one_line_error(capsys, [], 2)
    assert "--flagfile needs a value" in _one_line_error(capsys, [*base, "--flagfile"], 2)
    err = _one_line_error(capsys, [*base, "--flagfile", str(tmp_path / "none.flags")], 2)
    assert "none.flags not found" in err
    err = _one_line_error(
        capsys, [*base, f"--flagfile={flagfile}", "--test_labels", str(labels)], 2
    )
    assert "--test_labels and --test_images go together" in err
    err = _one_line_error(capsys, [*base, f"--flagfile={flagfile}", "--minutes", "0"], 2)
    assert "--minutes must be > 0" in err
    err = _one_line_error(capsys, [*base, f"--flagfile={flagfile}", "--seed", "-1"], 2)
    assert "--seed must be >= 0" in err
    err = _one_line_error(
        capsys, [*base, "--flagfile", str(flagfile), "--images", "/nonexistent"], 2
    )
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


def test_time_to_accuracy_ratio_on_hand_made_curves():
    seed = [[10.0, 30.0], [30.0, 20.0], [60.0, 15.0]]
    ours = [[5.0, 25.0], [12.0, 16.0], [18.0, 14.9], [40.0, 10.0]]
    result = benchmark_real.compare_curves(ours, seed)
    assert result["seed_final_mae_months"] == 15.0 and result["seed_train_minutes"] == 60.0
    assert result["our_minutes_to_seed_final"] == 18.0
    assert result["time_to_seed_final_ratio"] == pytest.approx(18.0 / 60.0)
    never = benchmark_real.compare_curves([[5.0, 25.0], [40.0, 15.5]], seed)
    assert never["time_to_seed_final_ratio"] is None
    assert "never reached the seed's final val MAE 15.00 (its best was 15.50)" in never["reason"]
    assert benchmark_real.compare_curves([], seed)["time_to_seed_final_ratio"] is None


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
            (out / "manifest.json").write_text(json.dumps(manifest))
            return []
        if module == "boneage_tpu.train":
            done = {"step": 30, "metrics": {"train_minutes": 0.25}}
            model_dir = pathlib.Path(value["--model_dir"])
            model_dir.mkdir(parents=True)
            (model_dir / "DONE").write_text(json.dumps(done))
            write_records(model_dir, _trainer_records(val_seconds=5.0))
            return []
        if module == "boneage_tpu.evaluate":
            out = pathlib.Path(value["--output"])
            out.mkdir(parents=True, exist_ok=True)
            mae = maes.get(out.name, 11.0)  # every shifted set: 11 = 1.1 x the plain MAE
            metrics = {"mae_months": mae, "mean_predictor_mae_months": 33.0, "n": len(val_ids)}
            metrics["mae_by_sex"] = {"male": mae, "female": mae}
            (out / "metrics.json").write_text(json.dumps(metrics))
            return []
        if module == "tools.benchmark_real_seed":
            curve = {"curve": [[0.1, 30.0], [0.3, 20.0]], "steps": 12, "images_per_second": 3.0}
            curve["settings"] = {}
            pathlib.Path(value["--curve"]).write_text(json.dumps(curve))
            return []
        raise AssertionError(f"unexpected command {args}")

    monkeypatch.setattr(benchmark_real, "run_command", fake)
    rows = [(i, 100.0 + k, k % 2 == 0) for k, i in enumerate(val_ids)]
    monkeypatch.setattr(benchmark_real, "split_records", lambda data_dir, split: rows)
    return calls


def test_json_has_the_keys_and_the_ratios(tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    ids = ["1", "2", "3"]
    for i in ids:
        pixels = np.random.default_rng(int(i)).integers(0, 256, (30, 20)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(images / f"{i}.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text("id,boneage,male\n1,100,True\n2,101,False\n3,102,True\n")
    flagfile = tmp_path / "r.flags"
    flagfile.write_text(TINY_FLAGS)
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
    comparison = result["seed_comparison"]
    assert comparison["our_curve"] == [
        [pytest.approx(12 / 60), 21.5],
        [pytest.approx(14 / 60), 19.25],
    ]
    # The seed ends at 20.0 after 0.3 min; ours is first at or below it at 14 s.
    assert comparison["time_to_seed_final_ratio"] == pytest.approx((14 / 60) / 0.3)
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


@pytest.mark.slow
@requires_tf_keras
def test_end_to_end_on_phantom_with_the_seed_comparison(tmp_path):
    json_path = tmp_path / "result.json"
    cmd = phantom_command("tools.benchmark_real", tmp_path, tmp_path / "b")
    cmd += ["--minutes", "0.3", "--json", str(json_path)]
    cmd += ["--compare_seed", "--eval_every", "50"]
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
    assert (comparison["time_to_seed_final_ratio"] is None) == ("reason" in comparison)
