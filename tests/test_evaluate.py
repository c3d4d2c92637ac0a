"""Tests for boneage_tpu.evaluate on tiny TFRecords and hand-made model directories."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from boneage_tpu.cli import evaluate as evaluate_cmd
from boneage_tpu.core import schema
from boneage_tpu.data import pipeline as data
from boneage_tpu.evaluate import continuous as continuous_eval
from boneage_tpu.evaluate import job as evaluate
from boneage_tpu.evaluate import once, report
from boneage_tpu.inference import runner as inference
from tests.helpers import recompute_from_csv
from tests.model_dirs import BATCH, flip_sensitive_model, make_run
from tests.records import write_toy_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
VAL_COUNT = 11  # not a multiple of BATCH: the last batch is padded


@pytest.fixture(scope="module")
def toy(toy_dataset, tmp_path_factory):
    """The session's 24/11 toy records (read-only) and two model directories made for them."""
    root = tmp_path_factory.mktemp("eval")
    data_dir = toy_dataset(splits={"train": 24, "val": VAL_COUNT})
    manifest = schema.read_manifest(data_dir)
    run_a = make_run(root / "run_a", manifest, seed=0)
    run_b = make_run(root / "run_b", manifest, seed=1)
    return {"data": data_dir, "a": run_a, "b": run_b, "manifest": manifest}


def _csv(output: str) -> pd.DataFrame:
    return pd.read_csv(pathlib.Path(output) / report.PREDICTIONS_NAME, dtype={"id": str})


def test_metrics_match_numpy_and_every_record_once(toy, tmp_path):
    out = str(tmp_path / "out")
    metrics = evaluate.run(model_dir=toy["a"], data=toy["data"], batch_size=BATCH, output=out)
    assert VAL_COUNT % BATCH != 0
    assert metrics["n"] == toy["manifest"]["splits"]["val"]["count"] == VAL_COUNT
    df = _csv(out)
    assert sorted(df["id"]) == [f"val{i:04d}" for i in range(VAL_COUNT)]
    ref = recompute_from_csv(pathlib.Path(out) / "predictions.csv", 0.0)
    written = json.loads((pathlib.Path(out) / "metrics.json").read_text())
    for key in ("mae_months", "rmse_months", "bias", "r2"):
        assert written[key] == pytest.approx(ref[key], abs=1e-6), key
    train_mean = toy["manifest"]["label_stats"]["mean_months"]
    naive = np.mean(np.abs(df["boneage"] - train_mean))
    assert written["mean_predictor_mae_months"] == pytest.approx(naive, abs=1e-6)
    assert written["checkpoint_step"] == 2
    manifest_bytes = (pathlib.Path(toy["data"]) / "manifest.json").read_bytes()
    import hashlib

    assert written["data_manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    for name in ("report.png", "report.html"):
        assert (pathlib.Path(out) / name).stat().st_size > 1000


def test_report_gallery_shows_worst_and_best_with_shortcut_check(toy, tmp_path):
    out = tmp_path / "gallery"
    metrics = evaluate.run(
        model_dir=toy["a"], data=toy["data"], batch_size=BATCH, output=str(out), gallery_size=3
    )
    check = metrics["shortcut_check"]
    assert check["map"] == "grad-cam" and check["model_dir"] == toy["a"]
    assert check["n"] + check["n_all_zero_maps"] == VAL_COUNT and check["n"] > 0
    assert 0.0 <= check["outside_hand_mass_fraction"] <= 1.0
    assert json.loads((out / "metrics.json").read_text())["shortcut_check"] == check
    page = (out / "report.html").read_text()
    assert "3 worst cases" in page and "3 best cases" in page
    df = _csv(str(out))
    order = (df["predicted"] - df["boneage"]).abs().sort_values(kind="stable").index
    shown = re.findall(r'alt="heatmap of ([^"]+)"', page)
    assert shown == [*df["id"][order[::-1][:3]], *df["id"][order[:3]]]
    assert page.count('src="data:image/png;base64,') == 1 + 6
    assert "<th>shortcut_check.outside_hand_mass_fraction</th>" in page
    assert " ± " not in page  # a regression model has no spread


def test_gallery_of_a_bins_model_shows_its_spread(toy, tmp_path):
    run = make_run(tmp_path / "bins", toy["manifest"], head="bins", num_bins=16)
    out = tmp_path / "out"
    metrics = evaluate.run(model_dir=run, data=toy["data"], batch_size=BATCH, output=str(out))
    assert metrics["shortcut_check"]["n"] > 0
    df = _csv(str(out))
    page = (out / "report.html").read_text()
    shown = re.findall(r'alt="heatmap of ([^"]+)"', page)
    assert len(shown) == VAL_COUNT  # the default 8 worst, then the 3 left as the best
    first = df.set_index("id").loc[shown[0]]
    assert f"predicted {first['predicted']:.1f} ± {first[report.SPREAD_COLUMN]:.1f}" in page


def test_no_gallery_skips_the_heatmap_pass(toy, tmp_path, capsys):
    out = tmp_path / "plain"
    metrics = evaluate.run(
        model_dir=toy["a"], data=toy["data"], batch_size=BATCH, output=str(out), no_gallery=True
    )
    assert "shortcut_check" not in metrics
    page = (out / "report.html").read_text()
    assert "worst cases" not in page and page.count("<img") == 1
    args = ["evaluate", f"--model_dir={toy['a']}", "--data=x", "--gallery_size=-1"]
    assert evaluate_cmd.main(args) == 2
    assert "--gallery_size must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["none", "rotflip"])
def test_runtime_flags_are_honoured_precision_and_xla(toy, tmp_path, capsys, tta):
    """The trainer's runtime group: bf16 builds the restored model in bf16, --jit_compile yes
    compiles the forward pass (TTA views included); both give the fp32 graph's predictions."""
    common = {"model_dir": toy["a"], "data": toy["data"], "batch_size": BATCH, "tta": tta}
    plain = _csv(evaluate.run(**common, output=str(tmp_path / "fp32"))["output"])
    assert ", fp32, XLA off" in capsys.readouterr().out
    runs = {
        "xla": {"jit_compile": "yes"},
        "bf16": {"precision": "bf16"},
    }
    for name, runtime in runs.items():
        out = _csv(evaluate.run(**common, **runtime, output=str(tmp_path / name))["output"])
        printed = capsys.readouterr().out
        assert (", fp32, XLA on" if name == "xla" else ", bf16, XLA off") in printed
        # bf16 keeps 8 bits of mantissa: months agree to ~1 % of the 0..228 range.
        atol = 1e-3 if name == "xla" else 3.0
        np.testing.assert_allclose(out["predicted"], plain["predicted"], atol=atol)
        if name == "bf16":
            assert not np.array_equal(out["predicted"], plain["predicted"])


def test_default_output_and_checkpoint_choice(toy):
    m1 = evaluate.run(model_dir=toy["a"], data=toy["data"], checkpoint="1", batch_size=BATCH)
    m2 = evaluate.run(model_dir=toy["a"], data=toy["data"], checkpoint="latest", batch_size=BATCH)
    assert m1["output"] == f"{toy['a']}/eval/val-1" and m1["checkpoint_step"] == 1
    assert m2["output"] == f"{toy['a']}/eval/val-2" and m2["checkpoint_step"] == 2
    assert m1["mae_months"] != m2["mae_months"]  # different weights were restored
    # The Keras export holds the step-2 weights: same predictions as checkpoint 2.
    m3 = evaluate.run(model_dir=toy["a"], data=toy["data"], checkpoint="export", batch_size=BATCH)
    assert m3["output"].endswith("/eval/val-export")
    np.testing.assert_allclose(
        _csv(m3["output"])["predicted"], _csv(m2["output"])["predicted"], rtol=1e-6
    )


def test_tta_flip_is_the_mean_of_image_and_mirror(toy, tmp_path):
    run = tmp_path / "flipper"
    shutil.copytree(toy["a"], run, ignore=shutil.ignore_patterns("eval", "export"))
    (run / "export").mkdir()
    flip_sensitive_model().save(run / "export" / "model.keras")
    common = {"model_dir": str(run), "data": toy["data"], "checkpoint": "export", "batch_size": 3}
    plain = _csv(evaluate.run(**common, tta="none")["output"])
    flip_metrics = evaluate.run(**common, tta="flip")
    flipped = _csv(flip_metrics["output"])
    assert (run / "eval" / "val-export-flip" / "metrics.json").exists()
    # Reference: the same pixels straight from the input pipeline, through numpy.
    weights = flip_sensitive_model().get_layer("pixels").w.numpy()
    ds = data.build_dataset(toy["data"], "val", training=False, batch_size=VAL_COUNT, image_size=32)
    batch = next(iter(ds))
    images = batch["image"].numpy().astype(np.float64)
    f = 100.0 + np.sum(images * weights, axis=(1, 2, 3))
    f_mirror = 100.0 + np.sum(images[:, :, ::-1] * weights, axis=(1, 2, 3))
    ids = [i.decode() for i in batch["id"].numpy()]
    plain, flipped = plain.set_index("id").loc[ids], flipped.set_index("id").loc[ids]
    np.testing.assert_allclose(plain["predicted"], f, atol=1e-3)
    np.testing.assert_allclose(flipped["predicted"], (f + f_mirror) / 2, atol=1e-3)
    assert np.max(np.abs(flipped["predicted"].to_numpy() - plain["predicted"].to_numpy())) > 0.05
    # Each view's own MAE: the image's and the mirror's, which differ for this model.
    views = flip_metrics["tta_views"]
    assert [(v["angle"], v["flip"]) for v in views] == [(0.0, False), (0.0, True)]
    true = batch["boneage"].numpy().astype(np.float64)
    np.testing.assert_allclose(views[0]["mae_months"], np.mean(np.abs(f - true)), atol=1e-3)
    np.testing.assert_allclose(views[1]["mae_months"], np.mean(np.abs(f_mirror - true)), atol=1e-3)
    assert abs(views[0]["mae_months"] - views[1]["mae_months"]) > 1e-3
    assert flip_metrics["mae_months"] == pytest.approx(flip_metrics["mae_uncorrected_months"])
    assert "tta_views" not in json.loads((run / "eval" / "val-export" / "metrics.json").read_text())


def test_runner_keeps_each_views_prediction_and_their_mean_is_the_tta_result(toy):
    ds = data.build_dataset(toy["data"], "val", training=False, batch_size=4, image_size=32)
    model = flip_sensitive_model()
    result = inference.predict_dataset(model, ds, tta="rotflip")
    assert result.views.shape == (10, VAL_COUNT)
    np.testing.assert_allclose(result.views.mean(axis=0), result.predicted, rtol=1e-6)
    plain = inference.predict_dataset(model, ds, tta="none")
    identity = inference.tta_views("rotflip").index((0.0, False))
    np.testing.assert_allclose(result.views[identity], plain.predicted, rtol=1e-6)
    assert plain.views.shape == (1, VAL_COUNT)


def _predicted(metrics: dict) -> np.ndarray:
    return _csv(metrics["output"]).sort_values("id")["predicted"].to_numpy()


def test_correction_is_the_one_fitted_for_the_tta_mode(toy, tmp_path, capsys):
    """A run with only a plain line applies it to plain predictions, never to TTA means."""
    run = make_run(tmp_path / "plain_fit", toy["manifest"], bias_slope=1.1, bias_intercept=-3.0)
    common = {"model_dir": run, "data": toy["data"], "batch_size": BATCH, "no_gallery": True}
    plain = evaluate.run(**common, output=str(tmp_path / "plain"))
    assert plain["bias_correction"] == {"slope": 1.1, "intercept": -3.0}
    assert plain["bias_correction_status"] == "applied" and plain["headline"] == "corrected"
    assert plain["models"][0]["bias_correction"] == {"slope": 1.1, "intercept": -3.0}
    assert not plain["in_sample"]  # make_run's config names another data folder
    assert plain["mae_months"] == pytest.approx(plain["mae_corrected_months"])
    off = evaluate.run(**common, correction="none", output=str(tmp_path / "off"))
    assert off["bias_correction"] is None and off["bias_correction_status"] == "off"
    np.testing.assert_allclose(_predicted(plain), 1.1 * _predicted(off) - 3.0, rtol=1e-5)
    assert off["mae_months"] == pytest.approx(plain["mae_uncorrected_months"], rel=1e-5)
    capsys.readouterr()
    flip = evaluate.run(**common, tta="flip", output=str(tmp_path / "flip"))
    assert "no bias correction fitted for --tta flip (fitted for: none)" in capsys.readouterr().out
    assert flip["bias_correction"] is None and flip["mae_corrected_months"] is None
    assert flip["bias_correction_status"] == "not_fitted_for_tta"
    assert flip["bias_correction_fitted_for"] == ["none"]
    assert flip["mae_months"] == pytest.approx(flip["mae_uncorrected_months"])
    # The flip means are uncorrected: the mean of the model's own (plain line undone) views.
    views_mae = [v["mae_months"] for v in flip["tta_views"]]
    assert views_mae[0] == pytest.approx(off["mae_months"], rel=1e-5)
    # A run with its own flip line applies that one to the flip means.
    both = make_run(
        tmp_path / "both_fits",
        toy["manifest"],
        bias_slope=1.1,
        bias_intercept=-3.0,
        tta_corrections={"flip": (0.9, 4.0)},
    )
    common["model_dir"] = both
    fitted = evaluate.run(**common, tta="flip", output=str(tmp_path / "both"))
    assert fitted["bias_correction"] == {"slope": 0.9, "intercept": 4.0}
    assert fitted["bias_correction_fitted_for"] == ["flip", "none"]
    np.testing.assert_allclose(_predicted(fitted), 0.9 * _predicted(flip) + 4.0, rtol=1e-5)
    raw = evaluate.run(**common, tta="flip", correction="none", output=str(tmp_path / "raw"))
    np.testing.assert_allclose(_predicted(raw), _predicted(flip), rtol=1e-5)


def test_tta_corrected_swaps_the_models_plain_line_for_the_modes(toy, tmp_path):
    from boneage_tpu.inference import restore

    run = make_run(
        tmp_path / "swap",
        toy["manifest"],
        bias_slope=2.0,
        bias_intercept=10.0,
        tta_corrections={"rotflip": (0.5, 1.0)},
    )
    loaded = restore.load_model(run, "export")
    assert restore.baked_correction(loaded.model) == (2.0, 10.0)
    months = np.array([110.0, 60.0])  # the model's output: 2 * (50, 25) + 10
    np.testing.assert_array_equal(restore.tta_corrected(loaded, months, "none"), months)
    np.testing.assert_array_equal(restore.tta_corrected(loaded, months, "flip"), [50.0, 25.0])
    np.testing.assert_array_equal(restore.tta_corrected(loaded, months, "rotflip"), [26.0, 13.5])


def test_in_sample_correction_reports_the_uncorrected_headline(toy, tmp_path, capsys):
    """Evaluated on the split and data folder it was fitted on, the line is in-sample."""
    run = make_run(
        tmp_path / "in_sample",
        toy["manifest"],
        data=toy["data"] + "/",  # spelled differently: the same folder
        bias_slope=1.1,
        bias_intercept=-3.0,
        val_split="val",
    )
    common = {"model_dir": run, "data": toy["data"], "batch_size": BATCH, "no_gallery": True}
    capsys.readouterr()
    inside = evaluate.run(**common, output=str(tmp_path / "inside"))
    assert "mae_months is the uncorrected MAE" in capsys.readouterr().out
    assert inside["in_sample"] and inside["headline"] == "uncorrected"
    assert inside["bias_correction"] == {"slope": 1.1, "intercept": -3.0}
    assert inside["mae_months"] == pytest.approx(inside["mae_uncorrected_months"])
    assert inside["mae_corrected_months"] != pytest.approx(inside["mae_months"])
    # metrics.json and predictions.csv agree: the csv holds the uncorrected predictions.
    ref = recompute_from_csv(pathlib.Path(inside["output"]) / "predictions.csv", 0.0)
    assert ref["mae_months"] == pytest.approx(inside["mae_months"], abs=1e-6)
    outside = evaluate.run(**common, split="train", output=str(tmp_path / "outside"))
    assert not outside["in_sample"] and outside["headline"] == "corrected"
    assert outside["mae_months"] == pytest.approx(outside["mae_corrected_months"])


def test_derived_json_keeps_corrections_per_mode_and_reads_old_files(tmp_path):
    from boneage_tpu.core import config as config_lib
    from boneage_tpu.core import model_dir as model_dir_lib

    derived = config_lib.Derived(bias_slope=1.1, bias_intercept=-3.0)
    derived.tta_corrections = {"rotflip": (0.9, 4.0)}
    back = model_dir_lib.derived_from_dict(json.loads(derived.to_json()))
    assert back == derived and back.correction("rotflip") == (0.9, 4.0)
    assert back.correction("none") == (1.1, -3.0) and back.correction("flip") is None
    assert back.fitted_modes() == ["none", "rotflip"]
    # An older derived.json (or flat config.json): its one line is the plain predictions'.
    old = model_dir_lib.derived_from_dict({"label_std": 40.0, "bias_slope": 1.2})
    assert old.tta_corrections == {} and old.fitted_modes() == ["none"]
    for bad in ({"none": [1, 0]}, {"flip": [1]}, {"flip": [1, float("nan")]}, []):
        with pytest.raises(model_dir_lib.ModelDirError, match="tta_corrections"):
            model_dir_lib.derived_from_dict({"label_std": 40.0, "tta_corrections": bad})


@pytest.mark.slow
def test_ensemble_averages_members(toy):
    common = {"data": toy["data"], "batch_size": BATCH}
    a = _csv(evaluate.run(model_dir=toy["a"], **common)["output"])
    b = _csv(evaluate.run(model_dir=toy["b"], **common)["output"])
    ens = evaluate.run(model_dirs=(toy["a"], toy["b"]), **common)
    assert ens["output"] == f"{toy['a']}/eval/val-ensemble-2_2"
    assert [m["model_dir"] for m in ens["models"]] == [toy["a"], toy["b"]]
    e = _csv(ens["output"])
    assert not np.allclose(a["predicted"], b["predicted"])
    np.testing.assert_allclose(e["predicted"], (a["predicted"] + b["predicted"]) / 2, rtol=1e-12)


@pytest.mark.slow
def test_continuous_evaluates_each_checkpoint_once_and_restarts(toy, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy["a"], run, ignore=shutil.ignore_patterns("eval"))
    (run / "DONE").write_text(json.dumps({"step": 2}))
    config = evaluate.EvalConfig(
        model_dirs=(str(run),), data=toy["data"], batch_size=BATCH, continuous=True, timeout=60
    )
    first = evaluate.run(config)
    assert first["evaluated_steps"] == [1, 2] and first["stop_reason"] == "done"
    assert (run / "eval" / "val-1" / "metrics.json").exists()
    second = evaluate.run(config)  # a restarted evaluator redoes nothing
    assert second["evaluated_steps"] == [] and second["already_evaluated_steps"] == [1, 2]
    events = list((run / "logs" / "eval").glob("events.out.tfevents.*"))
    scalars = []
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        scalars += [(event.step, v.tag) for v in event.summary.value]
    assert (1, "mae_months") in scalars and (2, "mae_months") in scalars
    assert sum(tag == "mae_months" for _, tag in scalars) == 2


@pytest.mark.slow
def test_continuous_stops_after_timeout_without_done(toy, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy["a"], run, ignore=shutil.ignore_patterns("eval"))
    now = [0.0]

    def fake_sleep(seconds: float) -> None:
        now[0] += seconds  # no real waiting: the clock jumps

    config = evaluate.EvalConfig(
        model_dirs=(str(run),),
        data=toy["data"],
        batch_size=BATCH,
        continuous=True,
        timeout=30,
        poll_interval=10,
    )
    summary = continuous_eval.run_continuous(
        config, tf.distribute.get_strategy(), sleep=fake_sleep, clock=lambda: now[0]
    )
    assert summary["evaluated_steps"] == [1, 2] and summary["stop_reason"] == "timeout"
    assert now[0] == 40.0  # polled at 0, 10, 20, 30 and 40 s; 40 - 0 > 30 stops


def _write_manifest(data_dir: pathlib.Path, **changes) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest.update(changes)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def bad_inputs(toy, tmp_path):
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    for name in ("config.json", "derived.json"):
        shutil.copy(pathlib.Path(toy["a"]) / name, empty / name)
    big = tmp_path / "big"
    write_toy_dataset(big, splits={"train": 4, "val": 3}, height=48, width=32)
    v2 = tmp_path / "v2"
    shutil.copytree(toy["data"], v2)
    _write_manifest(v2, schema_version=schema.SCHEMA_VERSION + 1)
    not_json = tmp_path / "not_json"
    shutil.copytree(toy["data"], not_json)
    (not_json / "manifest.json").write_text('{"schema_version": 1, "spl')
    corrupt = tmp_path / "corrupt"
    shutil.copytree(toy["data"], corrupt)
    shard = corrupt / schema.shard_name("val", 0, 2)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return {
        "no_ckpt": str(empty),
        "big": str(big),
        "v2": str(v2),
        "nodir": str(tmp_path / "nope"),
        "not_json": str(not_json),
        "corrupt": str(corrupt),
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ({"model_dir": "no_ckpt"}, "no checkpoints in"),
        ({"model_dir": "nodir"}, "model directory not found"),
        ({"split": "test"}, "split 'test' not in the data"),
        ({"data": "big"}, "stored at 48 px but the model was trained on 40 px"),
        ({"data": "v2"}, "schema version 2"),
        ({"checkpoint": "7"}, "no checkpoint at step 7"),
        ({"data": "nodir"}, "no manifest.json"),
        ({"tta": "rot"}, "value should be one of"),
        ({"data": "not_json"}, "not_json/manifest.json is not valid JSON"),
        (
            {"data": "corrupt"},
            "corrupt data shard {corrupt}/val-00000-of-00002.tfrecord: sha256 differs",
        ),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(toy, bad_inputs, capsys, case, message):
    args = {"model_dir": toy["a"], "data": toy["data"], "split": "val", "batch_size": str(BATCH)}
    args.update({k: bad_inputs.get(v, v) for k, v in case.items()})
    code = evaluate_cmd.main(["evaluate", *(f"--{k}={v}" for k, v in args.items())])
    err = capsys.readouterr().err.strip().splitlines()
    message = message.format(**bad_inputs)
    assert code == (2 if "tta" in case else 1)
    assert len(err) == 1 and err[0].startswith("evaluate: error:") and message in err[0], err


@pytest.mark.slow
def test_cli_on_two_replicas_matches_one(toy, tmp_path):
    """Runs the real CLI in a subprocess (virtual CPUs must be set before TF starts)."""
    outputs = {}
    for replicas in (1, 2):
        out = tmp_path / f"r{replicas}"
        cmd = [
            sys.executable,
            "-m",
            "boneage_tpu.evaluate",
            f"--model_dir={toy['a']}",
            f"--data={toy['data']}",
            "--batch_size=4",
            f"--virtual_cpus={replicas}",
            f"--output={out}",
        ]
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "mae_months" in proc.stdout
        outputs[replicas] = _csv(out)
    assert "2 replicas" in proc.stdout
    assert len(outputs[2]) == VAL_COUNT
    np.testing.assert_allclose(outputs[2]["predicted"], outputs[1]["predicted"], rtol=1e-5)
    assert list(outputs[2]["id"]) == list(outputs[1]["id"])


def _copy_tree(src: str, dst: str) -> None:
    for folder, _, files in tf.io.gfile.walk(src):
        rel = os.path.relpath(folder, src)
        target = dst if rel == "." else f"{dst}/{rel}"
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(f"{folder}/{name}", f"{target}/{name}", overwrite=True)


@pytest.mark.slow
@pytest.mark.gcs
def test_evaluate_and_predict_on_gcs(toy, gcs_emulator, gcs_dir, gcs_prefix, tmp_path):
    """Model, records and outputs all on gs:// (the local emulator), as on a TPU."""
    local_run = tmp_path / "run"
    shutil.copytree(toy["a"], local_run, ignore=shutil.ignore_patterns("eval"))
    _copy_tree(toy["data"], f"{gcs_dir}/data")
    _copy_tree(str(local_run), f"{gcs_dir}/run")
    metrics = evaluate.run(model_dir=f"{gcs_dir}/run", data=f"{gcs_dir}/data", batch_size=BATCH)
    assert metrics["n"] == VAL_COUNT and metrics["output"] == f"{gcs_dir}/run/eval/val-2"
    written = gcs_emulator.list(f"{gcs_prefix}/run/eval/val-2/")
    assert sorted(n.rsplit("/", 1)[-1] for n in written if not n.endswith("/")) == [
        "metrics.json", "predictions.csv", "report.html", "report.png",
    ]  # fmt: skip
    local = evaluate.run(model_dir=str(local_run), data=toy["data"], batch_size=BATCH)
    assert metrics["mae_months"] == pytest.approx(local["mae_months"], abs=1e-6)
    # predict reads the image from gs:// too.
    record = next(iter(tf.data.TFRecordDataset(f"{toy['data']}/val-00000-of-00002.tfrecord")))
    features = schema.parse_examples(record)
    tf.io.gfile.GFile(f"{gcs_dir}/x.png", "wb").write(features["image"].numpy())
    from boneage_tpu.predict import job as predict

    months = predict.predict_images(
        f"{gcs_dir}/run", [f"{gcs_dir}/x.png"], features["male"].numpy()
    )
    expected = _csv(str(tmp_path / "run" / "eval" / "val-2")).set_index("id")
    assert months[0] == pytest.approx(
        expected.loc[features["id"].numpy().decode(), "predicted"], abs=1e-4
    )


@pytest.mark.slow
def test_continuous_follows_a_concurrent_training_run(toy, tmp_path):
    """A real 2-step training subprocess checkpoints every step; the evaluator follows it."""
    data_dir, model_dir = toy["data"], tmp_path / "run"
    cmd = [
        sys.executable, "-m", "boneage_tpu.train", f"--data={data_dir}",
        f"--model_dir={model_dir}", "--backbone=tiny", "--image_size=32", "--batch_size=4",
        "--train_steps=2", "--checkpoint_every=1", "--steps_per_loop=1", "--noaugment",
        "--dense_units=8",
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    trainer = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def clock() -> float:
        # A trainer that died stops the evaluator at once instead of after the timeout.
        if trainer.poll() not in (None, 0):
            raise RuntimeError(f"trainer failed: {trainer.communicate()[0][-3000:]}")
        return time.monotonic()

    try:
        config = evaluate.EvalConfig(
            model_dirs=(str(model_dir),), data=str(data_dir), batch_size=BATCH,
            continuous=True, timeout=300, poll_interval=0.2,
        )  # fmt: skip
        summary = continuous_eval.run_continuous(config, tf.distribute.get_strategy(), clock=clock)
    finally:
        log, _ = trainer.communicate(timeout=180)
    assert trainer.returncode == 0, log[-3000:]
    assert summary["stop_reason"] == "done", log[-3000:]
    assert summary["evaluated_steps"] == [1, 2] and summary["skipped"] == []
    for step in (1, 2):
        assert (model_dir / "eval" / f"val-{step}" / "report.html").exists()
    # The evaluator's MAE at the last step is the trainer's own validation MAE.
    done = json.loads((model_dir / "DONE").read_text())
    final = summary["metrics"][2]["mae_months"]
    assert final == pytest.approx(done["metrics"]["val_mae_months"], abs=1e-3)


def test_continuous_reports_a_checkpoint_deleted_before_evaluation(toy, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(toy["a"], run, ignore=shutil.ignore_patterns("eval"))
    (run / "DONE").write_text(json.dumps({"step": 2}))
    real = once.evaluate_once

    def racing_trainer(config, strategy, *, checkpoint, **kwargs):
        if checkpoint == "1":  # the trainer's keep-K clean-up wins the race for step 1
            for path in (run / "checkpoints").glob("ckpt-1.*"):
                path.unlink()
            raise tf.errors.NotFoundError(None, None, "ckpt-1.index not found")
        return real(config, strategy, checkpoint=checkpoint, **kwargs)

    monkeypatch.setattr(once, "evaluate_once", racing_trainer)
    config = evaluate.EvalConfig(
        model_dirs=(str(run),), data=toy["data"], batch_size=BATCH, continuous=True
    )
    summary = evaluate.run(config)
    assert summary["evaluated_steps"] == [2]
    assert [s["step"] for s in summary["skipped"]] == [1]
    assert "keep-K" in summary["skipped"][0]["reason"]
