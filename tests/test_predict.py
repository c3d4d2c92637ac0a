"""Tests for boneage_tpu.predict: PNG/JPEG/DICOM in, months out, same pixels as training data."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage_tpu.cli import predict as predict_cmd
from boneage_tpu.core import schema
from boneage_tpu.evaluate import job as evaluate
from boneage_tpu.evaluate import report
from boneage_tpu.phantom import render as phantom_render
from boneage_tpu.predict import job as predict
from tests.model_dirs import flip_sensitive_model


def write_dicom(path: pathlib.Path, image: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    """Writes a 16-bit single-frame DICOM file of a uint8 image (values widened x257)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientSex = "F"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    values = image.astype(np.uint16) * 257
    if photometric == "MONOCHROME1":
        values = 65535 - values
    ds.PixelData = values.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_predict_matches_evaluate_on_converted_records(phantom_run, tmp_path):
    """predict prepares files exactly as converter + input pipeline did: same months."""
    metrics = evaluate.run(
        model_dir=phantom_run["model"],
        data=phantom_run["records"],
        split="test",
        output=str(tmp_path / "eval"),  # not into the session's shared model directory
    )
    # A converted test set has no train split: the naive baseline uses the training mean.
    assert metrics["train_mean_source"].startswith("derived.json")
    evaluated = pd.read_csv(
        pathlib.Path(metrics["output"]) / report.PREDICTIONS_NAME, dtype={"id": str}
    )
    rows = predict.run(
        predict.PredictConfig(
            model_dir=phantom_run["model"],
            labels=phantom_run["labels"],
            images_dir=str(phantom_run["images"]),
        )
    )
    assert len(rows) == 6 and all(math.isfinite(r["predicted"]) for r in rows)
    got = {r["id"]: r["predicted"] for r in rows}
    for image_id, expected in zip(evaluated["id"], evaluated["predicted"], strict=True):
        assert got[image_id] == pytest.approx(expected, abs=1e-4), image_id
    assert all(
        r["boneage"] is not None and r["error"] == r["predicted"] - r["boneage"] for r in rows
    )


def test_png_jpeg_and_dicom_inputs(phantom_run, tmp_path):
    image = phantom_render.render_phantom(120.0, True, seed=5, width=64, height=80)
    image[0, 0], image[0, 1] = 0, 255  # full range: DICOM's min-max scaling is then the identity
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "b.jpg", quality=95)
    write_dicom(tmp_path / "c.dcm", image)
    write_dicom(tmp_path / "d.dcm", image, photometric="MONOCHROME1")
    paths = [str(tmp_path / n) for n in ("a.png", "b.jpg", "c.dcm", "d.dcm")]
    months = predict.predict_images(phantom_run["model"], paths, [1, 1, 1, 1])
    assert len(months) == 4 and all(math.isfinite(m) for m in months)
    # Same pixels -> same months, whatever the container.
    assert months[2] == pytest.approx(months[0], abs=1e-4)
    assert months[3] == pytest.approx(months[0], abs=1e-4)
    assert months[1] == pytest.approx(months[0], abs=5.0)  # JPEG: lossy, close
    female = predict.predict_images(phantom_run["model"], paths[:1], False)
    assert female[0] != months[0]  # the sex input is used


def test_cli_prints_months_for_png_jpeg_and_dicom(phantom_run, tmp_path, capsys):
    image = phantom_render.render_phantom(60.0, False, seed=6, width=64, height=80)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "b.jpg")
    write_dicom(tmp_path / "c.dcm", image)
    paths = [str(tmp_path / n) for n in ("a.png", "b.jpg", "c.dcm")]
    assert predict_cmd.main(["predict", f"--model={phantom_run['model']}", "--sex=F", *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["a", "b", "c"]
    assert all(math.isfinite(float(line.split()[2])) for line in lines)


def test_cli_prints_a_table_and_writes_csv(phantom_run, tmp_path, capsys):
    pngs = sorted(str(p) for p in phantom_run["images"].glob("*.png"))[:3]
    assert predict_cmd.main(["predict", f"--model={phantom_run['model']}", "--sex=M", *pngs]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].split()[:4] == ["id", "sex", "months", "years"]
    assert len(out) == 4
    for line, path in zip(out[1:], pngs, strict=True):
        fields = line.split()
        assert fields[0] == pathlib.Path(path).stem and fields[1] == "M"
        assert math.isfinite(float(fields[2]))
        assert float(fields[3]) == pytest.approx(float(fields[2]) / 12, abs=0.06)
    target = tmp_path / "out.csv"
    args = ["predict", f"--model={phantom_run['model']}", "--sex=F", f"--output={target}", *pngs]
    assert predict_cmd.main(args) == 0
    with open(target, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["path"] for r in table] == pngs
    assert all(r["male"] == "0" and math.isfinite(float(r["predicted_months"])) for r in table)


def test_cli_writes_one_heatmap_overlay_per_image(phantom_run, tmp_path, capsys):
    pngs = sorted(str(p) for p in phantom_run["images"].glob("*.png"))[:4]
    maps = tmp_path / "maps"
    args = ["predict", f"--model={phantom_run['model']}", "--sex=F", f"--heatmaps={maps}", *pngs]
    assert predict_cmd.main(args) == 0
    assert f"wrote 4 heatmaps to {maps}" in capsys.readouterr().out
    assert sorted(p.stem for p in maps.glob("*.png")) == sorted(pathlib.Path(p).stem for p in pngs)
    for path in maps.glob("*.png"):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        assert rgb.shape[0] > 250 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100


def test_tta_flip_averages_mirror(phantom_run, tmp_path):
    run = tmp_path / "flipper"
    (run / "export").mkdir(parents=True)
    # PNG data at the model's size: no resampling or lossy coding, so mirroring the file
    # mirrors the model input exactly.
    shutil.copy(pathlib.Path(phantom_run["model"], "config.json"), run / "config.json")
    derived = json.loads(pathlib.Path(phantom_run["model"], "derived.json").read_text())
    derived.update(data_encoding="png", data_image_size=32)
    (run / "derived.json").write_text(json.dumps(derived))
    flip_sensitive_model().save(run / "export" / "model.keras")
    image = np.zeros((32, 32), np.uint8)
    image[5:30, 3:9] = 200  # a bar on the left only
    Image.fromarray(image).save(tmp_path / "left.png")
    Image.fromarray(image[:, ::-1]).save(tmp_path / "right.png")
    paths = [str(tmp_path / "left.png"), str(tmp_path / "right.png")]
    plain = predict.predict_images(str(run), paths, 1.0)
    flipped = predict.predict_images(str(run), paths, 1.0, tta="flip")
    assert plain[0] != pytest.approx(plain[1], abs=1e-3)
    assert flipped[0] == pytest.approx((plain[0] + plain[1]) / 2, abs=1e-3)
    assert flipped[1] == pytest.approx(flipped[0], abs=1e-3)
    # The flip means get the line fitted for flip (the model itself holds no plain line).
    derived["tta_corrections"] = {"flip": [0.9, 4.0]}
    (run / "derived.json").write_text(json.dumps(derived))
    corrected = predict.predict_images(str(run), paths, 1.0, tta="flip")
    np.testing.assert_allclose(corrected, 0.9 * np.asarray(flipped) + 4.0, rtol=1e-9)
    assert predict.predict_images(str(run), paths, 1.0) == pytest.approx(plain, abs=1e-9)


@pytest.mark.shared
def test_real_rsna_sample_pngs(phantom_run, rsna_sample_dir, capsys):
    csv_path = rsna_sample_dir / "boneage-training-dataset.csv"
    images = rsna_sample_dir / "boneage-training-dataset"
    code = predict_cmd.main(
        ["predict", f"--model={phantom_run['model']}", f"--labels={csv_path}", f"--images={images}"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()[1:]
    ids = {line.split()[0] for line in lines}
    assert len(lines) == 12 and {"1578", "2110"} <= ids  # palette PNGs included
    assert all(math.isfinite(float(line.split()[2])) for line in lines)


@pytest.fixture
def bad_files(phantom_run, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    Image.fromarray(np.full((1, 1), 120, np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(np.full((300, 200), 255, np.uint8)).save(tmp_path / "white.png")
    bare = tmp_path / "model.keras"
    bare.write_bytes(b"x")
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    for name in ("config.json", "derived.json"):
        shutil.copy(pathlib.Path(phantom_run["model"], name), no_ckpt / name)
    good = str(next(phantom_run["images"].glob("*.png")))
    return {"dir": tmp_path, "good": good, "bare": str(bare), "no_ckpt": str(no_ckpt)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sex=M", "{dir}/empty.png"], "cannot use {dir}/empty.png: empty file"),
        (["--sex=M", "{good}", "{dir}/junk.png"], "cannot read 1 of 2 images"),
        (["--sex=M", "{dir}/missing.png"], "image file not found: {dir}/missing.png"),
        (["--sex=M", "{dir}"], "{dir} is a folder: give image files"),
        (
            ["--sex=M", "{dir}/tiny.png"],
            "{dir}/tiny.png: does not look like a hand radiograph: image too small",
        ),
        (["--sex=F", "{dir}/white.png"], "white.png: does not look like a hand radiograph: near"),
        (["{good}"], "uses the sex input: give --sex M or F"),
        (["--labels={dir}/none.csv", "--images={dir}"], "labels CSV not found"),
    ],
)
def test_bad_input_exits_nonzero_with_clear_line(phantom_run, bad_files, capsys, args, message):
    argv = ["predict", f"--model={phantom_run['model']}", *(a.format(**bad_files) for a in args)]
    assert predict_cmd.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    message = message.format(**bad_files)
    assert err[-1].startswith("predict: error:") and message in err[-1], err
    assert all(line.startswith(("unreadable ", "predict: error:")) for line in err), err
    assert len(err) == 1 or "of 2 images" in message  # One input: one line.


def test_force_predicts_an_implausible_image_with_a_warning(phantom_run, bad_files, capsys):
    argv = ["predict", f"--model={phantom_run['model']}", "--sex=F", "--force"]
    assert predict_cmd.main([*argv, f"{bad_files['dir']}/white.png"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"warning: {bad_files['dir']}/white.png: near-constant image (std 0.0 grey levels): "
        "no radiograph content"
    )
    assert len(captured.out.strip().splitlines()) == 2  # Header + the prediction.


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{bare}", "a bare .keras file"),
        ("{no_ckpt}", "no checkpoints in"),
        ("{dir}/x", "not found"),
    ],
)
def test_bad_model_exits_nonzero(bad_files, capsys, model, message):
    argv = ["predict", f"--model={model.format(**bad_files)}", "--sex=F", bad_files["good"]]
    assert predict_cmd.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_skip_unreadable_predicts_the_rest(phantom_run, bad_files, capsys):
    argv = [
        "predict",
        f"--model={phantom_run['model']}",
        "--sex=M",
        "--skip_unreadable",
        bad_files["good"],
        f"{bad_files['dir']}/junk.png",
    ]
    assert predict_cmd.main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "junk.png" in captured.err
    assert len(captured.out.strip().splitlines()) == 2


def test_missing_data_encoding_is_reported(phantom_run, tmp_path):
    assert schema.SCHEMA_VERSION == 1  # derived.json below mimics a run without data stats
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(pathlib.Path(phantom_run["model"], "config.json"), run / "config.json")
    derived = json.loads(pathlib.Path(phantom_run["model"], "derived.json").read_text())
    assert derived["data_encoding"] == "jpeg"
    (run / "derived.json").write_text(json.dumps({**derived, "data_encoding": ""}))
    (run / "export").mkdir()
    flip_sensitive_model().save(run / "export" / "model.keras")
    with pytest.raises(predict.PredictError, match="data_image_size/data_encoding"):
        predict.predict_images(str(run), [str(next(phantom_run["images"].glob("*.png")))], 1.0)
