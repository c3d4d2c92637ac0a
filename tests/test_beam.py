"""The converter and predict on Apache Beam (`--runner beam`, Beam's local runner) vs locally.

Each test runs a real pipeline on 2 worker processes (`direct_num_workers=2`) and compares its
output with the local runner's on the same inputs, bad ones mixed in. Without Apache Beam (the
`[beam]` extra) every test here skips and says so.
"""

from __future__ import annotations

import csv
import io
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from boneage_tpu.cli import predict as predict_cli
from boneage_tpu.convert import job as make_tfrecords
from boneage_tpu.core import schema
from boneage_tpu.data import images, verify
from boneage_tpu.predict import job as predict
from boneage_tpu.train import job as train
from tests import helpers
from tests.helpers import without_time

pytest.importorskip(
    "apache_beam",
    reason="Apache Beam is not installed: pip install '.[beam]' runs these tests "
    "(.ci/run installs it)",
)

NUM_IMAGES = 24
OPTIONS = {"image_size": 32, "encoding": "png", "num_shards": 3, "val_fraction": 0.2}


def _blank_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((80, 64), 128, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(phantom_images, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Phantom images in Kaggle layout with bad inputs: corrupt, truncated, blank, missing,
    a bad CSV row and an image without a row (on a copy of the session's phantom set)."""
    root = tmp_path_factory.mktemp("beam") / "phantom"
    shutil.copytree(phantom_images(NUM_IMAGES, seed=7, width=64, height=80), root)
    folder = root / "boneage-training-dataset"
    csv = root / "boneage-training-dataset.csv"
    files = sorted(folder.glob("*.png"))
    files[0].write_bytes(b"not an image at all")
    files[1].write_bytes(files[1].read_bytes()[:200])
    files[2].write_bytes(_blank_png())
    files[3].unlink()
    shutil.copy(files[4], folder / "99999.png")  # An image no CSV row names.
    csv.write_text(csv.read_text() + "12345,abc,True\n")
    return {"csv": csv, "images": folder}


def _convert(inputs, out, **kwargs) -> dict:
    return make_tfrecords.convert(
        str(inputs["csv"]), str(inputs["images"]), str(out), quiet=True, **OPTIONS, **kwargs
    )


def _records(out: str, manifest: dict) -> dict[str, set]:
    """split -> {(id, boneage, male, decoded pixels)} of every record."""
    result = {}
    for split in manifest["splits"]:
        parsed = tf.data.TFRecordDataset(schema.shard_paths(out, manifest, split))
        rows = set()
        for r in parsed.map(schema.parse_examples):
            r = {k: v.numpy() for k, v in r.items()}
            pixels = images.decode(r["image"], "png", int(r["height"]), int(r["width"]))
            rows.add((r["id"].decode(), float(r["boneage"]), int(r["male"]), pixels.tobytes()))
        result[split] = rows
    return result


@pytest.fixture(scope="module")
def local(inputs, tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("local") / "out"
    return str(out), _convert(inputs, out, num_workers=0)


def _assert_same(local_out, local_manifest, beam_out, beam_manifest) -> None:
    reasons = {(s["id"], s["reason"]) for s in local_manifest["skipped"]}
    # The bad inputs are really there: 3 unusable images, a missing one, a bad row, an orphan.
    assert len(reasons) == 6, reasons
    assert [(s["id"], s["reason"]) for s in beam_manifest["skipped"]] == [
        (s["id"], s["reason"]) for s in local_manifest["skipped"]
    ]
    local_records = _records(local_out, local_manifest)
    assert _records(beam_out, beam_manifest) == local_records
    assert sum(len(r) for r in local_records.values()) == NUM_IMAGES - 4
    # Plan order is kept: the shards are the same bytes, so the manifests are equal too.
    assert without_time(beam_manifest) == without_time(local_manifest)
    assert verify.verify(beam_out) == 0


def test_beam_converter_equals_local_and_trains(inputs, local, tmp_path):
    out = tmp_path / "beam"
    manifest = _convert(inputs, out, num_workers=2, runner="beam")
    assert manifest == schema.read_manifest(str(out))
    _assert_same(*local, str(out), manifest)
    assert not (out / ".convert").exists()
    assert (out / "dataset_info.json").exists() and (out / "features.json").exists()
    config = helpers.train_config(str(out), tmp_path / "run", dense_units=(8,))
    result = train.run(config)
    assert result["step"] == 2 and np.isfinite(result["train_loss"]), result


class _Stop(Exception):
    pass


def test_beam_resumes_an_interrupted_conversion_and_rerun_is_a_no_op(inputs, local, tmp_path):
    out = tmp_path / "out"
    done = []

    def stop_after_two(name: str) -> None:
        done.append(name)
        if len(done) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _convert(inputs, out, num_workers=0, on_shard_done=stop_after_two)
    kept = {name: (out / name).stat().st_mtime_ns for name in done}
    manifest = _convert(inputs, out, num_workers=2, runner="beam")
    assert {name: (out / name).stat().st_mtime_ns for name in done} == kept  # Not rewritten.
    _assert_same(*local, str(out), manifest)
    assert _convert(inputs, out, runner="beam") == manifest  # Finished: nothing to do.


def test_beam_strict_fails_on_a_skipped_image(inputs, tmp_path):
    with pytest.raises(make_tfrecords.ConvertError, match="--strict"):
        _convert(inputs, tmp_path / "beam", num_workers=2, runner="beam", strict=True)


@pytest.mark.gcs
def test_beam_converter_on_gcs_equals_local(inputs, local, gcs_dir, gcs_emulator, gcs_prefix):
    """gs:// output through TF's filesystem in every Beam worker (they inherit the env)."""
    manifest = _convert(inputs, gcs_dir, num_workers=2, runner="beam")
    _assert_same(*local, gcs_dir, manifest)
    names = {n.rsplit("/", 1)[-1] for n in gcs_emulator.list(gcs_prefix)}
    assert schema.MANIFEST_NAME in names and not any(".convert" in n for n in names), names


@pytest.fixture(scope="module")
def trained_run(phantom_images, tmp_path_factory) -> dict[str, str]:
    """50 phantom images, a corrupt file beside them, and a 2-step run with its exports."""
    root = tmp_path_factory.mktemp("predict")
    shutil.copytree(phantom_images(50, seed=11, width=64, height=80), root / "ph")  # changed below
    folder = root / "ph" / "boneage-training-dataset"
    data = make_tfrecords.convert(
        str(root / "ph" / "boneage-training-dataset.csv"),
        str(folder),
        str(root / "records"),
        quiet=True,
        num_workers=0,
        **OPTIONS,
    )
    assert data["records_written"] == 50
    config = helpers.train_config(str(root / "records"), root / "run", dense_units=(8,))
    exports = train.run(config)["exports"]
    assert pathlib.Path(exports["saved_model"]).is_dir()
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return {
        "run": str(root / "run"),
        "images": str(folder),
        "csv": str(root / "ph" / "boneage-training-dataset.csv"),
    }


def _read_csvs(folder: pathlib.Path, name: str) -> list[dict]:
    rows = []
    for path in sorted(folder.glob(f"{name}-*.csv")):
        rows.extend(csv.DictReader(path.open()))
    return rows


def test_beam_predict_equals_local_predict_and_itemises_a_corrupt_file(
    trained_run, tmp_path, capsys
):
    paths = sorted(str(p) for p in pathlib.Path(trained_run["images"]).glob("*.png"))
    local = predict.run(
        predict.PredictConfig(
            model_dir=trained_run["run"], paths=tuple(paths), sex="M", skip_unreadable=True
        )
    )
    corrupt = f"{trained_run['images']}/corrupt.png"
    local_reason = next(
        line.split(": ", 1)[1]
        for line in capsys.readouterr().err.splitlines()
        if line.startswith(f"skipped {corrupt}")
    )
    assert len(local) == 50
    out = tmp_path / "scores"
    code = predict_cli.main(
        [
            "predict",
            "--runner=beam",
            f"--model={trained_run['run']}",
            f"--input={trained_run['images']}/*.png",
            f"--output={out}",
            "--sex=M",
            "--output_shards=2",
            "--beam_options=--direct_num_workers=2",
        ]
    )
    assert code == 0
    rows = _read_csvs(out, "predictions")
    assert len(rows) == 50 and len(list(out.glob("predictions-*-of-00002.csv"))) == 2
    beam_months = {r["path"]: float(r["predicted_months"]) for r in rows}
    for item in local:
        assert beam_months[item["path"]] == pytest.approx(item["predicted"], abs=1e-4)
    assert {r["id"] for r in rows} == {item["id"] for item in local}
    assert all(r["male"] == "1" and r["plausible"] == "1" and not r["problem"] for r in rows)
    assert _read_csvs(out, "unreadable") == [{"path": corrupt, "reason": local_reason}]
    assert "wrote 50 prediction(s) and 1 unreadable file(s)" in capsys.readouterr().out


def test_beam_predict_flags_without_beam_options_are_one_line_errors(trained_run, capsys):
    code = predict_cli.main(["predict", "--runner=beam", f"--model={trained_run['run']}", "a.png"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--runner beam takes --input PATTERN" in err[0], err


def test_beam_predict_takes_each_images_sex_from_a_csv(trained_run, tmp_path):
    local = predict.run(
        predict.PredictConfig(
            model_dir=trained_run["run"],
            labels=trained_run["csv"],
            images_dir=trained_run["images"],
        )
    )
    assert {item["male"] for item in local} == {0, 1}  # Both sexes, so a mix-up would show.
    out = tmp_path / "scores"
    counts = predict_beam_run(trained_run, out, sex_csv=trained_run["csv"])
    assert counts == {"predicted": 50, "unreadable": 1}
    rows = {r["id"]: r for r in _read_csvs(out, "predictions")}
    for item in local:
        assert int(rows[item["id"]]["male"]) == item["male"]
        assert float(rows[item["id"]]["predicted_months"]) == pytest.approx(
            item["predicted"], abs=1e-4
        )
    (unreadable,) = _read_csvs(out, "unreadable")
    assert "no sex for id 'corrupt'" in unreadable["reason"]


def test_beam_predict_flags_an_implausible_image_and_predicts_it(trained_run, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "blank.png").write_bytes(_blank_png())
    shutil.copy(sorted(pathlib.Path(trained_run["images"]).glob("1*.png"))[0], folder / "hand.png")
    out = tmp_path / "scores"
    run = {**trained_run, "images": str(folder)}
    assert predict_beam_run(run, out, sex=0.0) == {"predicted": 2, "unreadable": 0}
    rows = {r["id"]: r for r in _read_csvs(out, "predictions")}
    assert (rows["hand"]["plausible"], rows["hand"]["problem"]) == ("1", "")
    assert rows["blank"]["plausible"] == "0" and "near-constant" in rows["blank"]["problem"]
    assert np.isfinite(float(rows["blank"]["predicted_months"])) and rows["blank"]["male"] == "0"


def predict_beam_run(trained_run: dict, out: pathlib.Path, **kwargs) -> dict[str, int]:
    from boneage_tpu.predict import beam as predict_beam

    return predict_beam.run(
        model_dir=trained_run["run"],
        pattern=f"{trained_run['images']}/*.png",
        output=str(out),
        num_workers=2,
        quiet=True,
        **kwargs,
    )
