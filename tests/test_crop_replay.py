"""The hand crop after conversion: derived.json, predict's replay, evaluate's and resume's checks."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import schema
from boneage_tpu.data import pipeline as data
from boneage_tpu.evaluate import job as evaluate
from boneage_tpu.evaluate import report
from boneage_tpu.inference import restore
from boneage_tpu.predict import job as predict
from boneage_tpu.train import job as train
from boneage_tpu.train import setup
from boneage_tpu.train import state as train_state
from tests.hands import write_hand_dataset
from tests.helpers import convert, train_config
from tests.model_dirs import make_run
from tests.records import write_toy_dataset

ModelDirError = model_dir_lib.ModelDirError


def _cropped_data(tmp_path: pathlib.Path, n: int = 4, **kwargs) -> tuple[dict, pathlib.Path]:
    """n hand PNGs (the last without a findable hand) converted with --crop hand to 48 px PNG
    records in one `test` split; returns (manifest, images folder)."""
    csv, folder = write_hand_dataset(tmp_path / "hands", n=n)
    options = {"image_size": 48, "encoding": "png", "split_name": "test", "crop": "hand"}
    return convert(csv, folder, tmp_path / "data", **{**options, **kwargs}), folder


def _with_crop(manifest_dir: pathlib.Path, crop: str, margin: float | None) -> None:
    """Rewrites a data folder's manifest as if converted with another crop."""
    path = manifest_dir / schema.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(crop=crop, crop_margin=margin)
    path.write_text(json.dumps(manifest))


def test_training_copies_the_crop_into_derived_json(tmp_path):
    csv, folder = write_hand_dataset(tmp_path / "hands", n=10)
    convert(csv, folder, tmp_path / "hand", image_size=48, crop="hand", crop_margin=1.2)
    _, derived = setup.derive(train_config(str(tmp_path / "hand"), tmp_path / "run"))
    assert (derived.data_crop, derived.data_crop_margin) == ("hand", 1.2)
    assert model_dir_lib.derived_from_dict(json.loads(derived.to_json())) == derived
    convert(csv, folder, tmp_path / "plain", image_size=48)
    _, plain = setup.derive(train_config(str(tmp_path / "plain"), tmp_path / "run"))
    assert (plain.data_crop, plain.data_crop_margin) == ("none", 0.0)


def test_derived_json_checks_the_crop_and_reads_files_without_it():
    old = model_dir_lib.derived_from_dict({"label_std": 40.0})
    assert (old.data_crop, old.data_crop_margin) == ("none", 0.0)
    hand = model_dir_lib.derived_from_dict(
        {"label_std": 40.0, "data_crop": "hand", "data_crop_margin": 1.15}
    )
    assert (hand.data_crop, hand.data_crop_margin) == ("hand", 1.15)
    for bad, message in (
        ({"data_crop": "box"}, "data_crop must be one of none, hand, got 'box'"),
        ({"data_crop": 1}, "data_crop is 1, expected a string"),
        (
            {"data_crop": "hand"},
            "data_crop_margin must be in 1.0..4.0 with data_crop hand, got 0.0",
        ),
        ({"data_crop": "hand", "data_crop_margin": 9}, "data_crop_margin must be in 1.0..4.0"),
        ({"data_crop_margin": "wide"}, 'data_crop_margin is "wide", expected a number'),
    ):
        with pytest.raises(ModelDirError, match=message):
            model_dir_lib.derived_from_dict({"label_std": 40.0, **bad})


def test_data_of_another_crop_is_refused_in_one_line():
    manifest = {"schema_version": schema.SCHEMA_VERSION, "image_size": 48}  # No crop: none.
    plain = config_lib.Derived(
        label_std=1.0,
        data_image_size=48,
        data_encoding="png",
        schema_version=schema.SCHEMA_VERSION,
    )
    hand = dataclasses.replace(plain, data_crop="hand", data_crop_margin=1.15)
    cropped = {**manifest, "crop": "hand", "crop_margin": 1.15}
    restore.check_data_compatible(plain, manifest)
    restore.check_data_compatible(plain, {**manifest, "crop": "none", "crop_margin": None})
    restore.check_data_compatible(hand, cropped)
    with pytest.raises(ModelDirError) as info:
        restore.check_data_compatible(hand, manifest, "runs/m")
    assert str(info.value) == (
        "data was converted with --crop none but runs/m was trained on --crop hand "
        "--crop_margin 1.15 data: reconvert with boneage-make-tfrecords --crop hand "
        "--crop_margin 1.15"
    )
    with pytest.raises(ModelDirError, match="was trained on --crop none data"):
        restore.check_data_compatible(plain, cropped)
    with pytest.raises(ModelDirError, match="converted with --crop hand --crop_margin 1.3 but"):
        restore.check_data_compatible(hand, {**cropped, "crop_margin": 1.3})


def test_evaluate_refuses_data_of_another_crop(phantom_run, tmp_path):
    data_dir = tmp_path / "records"
    shutil.copytree(phantom_run["records"], data_dir)
    _with_crop(data_dir, "hand", 1.15)
    with pytest.raises(ModelDirError, match="data was converted with --crop hand --crop_margin"):
        evaluate.run(
            model_dir=phantom_run["model"],
            data=str(data_dir),
            split="test",
            output=str(tmp_path / "eval"),
        )


def test_predict_crops_new_images_as_the_converter_did(tmp_path, capsys):
    manifest, folder = _cropped_data(tmp_path)
    derived = config_lib.Derived(
        label_std=1.0,
        data_image_size=48,
        data_encoding="png",
        schema_version=manifest["schema_version"],
        data_crop="hand",
        data_crop_margin=manifest["crop_margin"],
    )
    files = schema.shard_paths(str(tmp_path / "data"), manifest, "test")
    seen = []
    for serialized in tf.data.TFRecordDataset(files):
        image_id = schema.parse_examples(serialized)["id"].numpy().decode()
        # The input pipeline's own view of the stored, cropped record ...
        expected = data.parse_records(tf.reshape(serialized, [1]), 32, "png")["image"][0]
        # ... is exactly what predict makes of the image file.
        got = predict.prepare_image(str(folder / f"{image_id}.png"), derived, 32)
        np.testing.assert_array_equal(got, expected.numpy(), err_msg=image_id)
        seen.append(image_id)
    assert sorted(seen) == ["h0", "h1", "h2", "h3"]
    err = capsys.readouterr().err
    assert "h3.png: hand crop: no hand found" in err and "predicting on the whole image" in err
    assert "h0.png" not in err
    # Without the crop the same file gives another input: the crop is really replayed.
    plain = dataclasses.replace(derived, data_crop="none", data_crop_margin=0.0)
    path = str(folder / "h0.png")
    uncropped = predict.prepare_image(path, plain, 32)
    assert not np.array_equal(uncropped, predict.prepare_image(path, derived, 32))


@pytest.mark.slow
def test_predict_matches_evaluate_on_cropped_records(tmp_path):
    manifest, folder = _cropped_data(tmp_path, n=6)
    run = make_run(tmp_path / "run", manifest, data_crop="hand", data_crop_margin=1.15)
    assert model_dir_lib.load_derived(run).data_crop == "hand"
    metrics = evaluate.run(
        model_dir=run, data=str(tmp_path / "data"), split="test", output=str(tmp_path / "eval")
    )
    evaluated = pd.read_csv(
        pathlib.Path(metrics["output"]) / report.PREDICTIONS_NAME, dtype={"id": str}
    )
    rows = predict.run(
        predict.PredictConfig(
            model_dir=run, labels=str(tmp_path / "hands" / "labels.csv"), images_dir=str(folder)
        )
    )
    got = {r["id"]: r["predicted"] for r in rows}
    assert sorted(got) == sorted(evaluated["id"]) and len(got) == 6
    for image_id, expected in zip(evaluated["id"], evaluated["predicted"], strict=True):
        assert got[image_id] == pytest.approx(expected, abs=1e-4), image_id


@pytest.mark.slow
def test_resume_with_data_of_another_crop_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    write_toy_dataset(tmp_path / "plain", splits={"train": 16})
    train.run(train_config(str(tmp_path / "plain"), model_dir, train_steps=1, val_split=""))
    write_toy_dataset(tmp_path / "hand", splits={"train": 16})
    _with_crop(tmp_path / "hand", "hand", 1.15)
    before = (model_dir / "derived.json").read_bytes()
    with pytest.raises(train_state.ResumeError) as info:
        train.run(train_config(str(tmp_path / "hand"), model_dir, train_steps=2, val_split=""))
    assert str(info.value) == (
        f"{model_dir} holds checkpoints trained on data converted with --crop none, but --data "
        f"{tmp_path / 'hand'} was converted with --crop hand --crop_margin 1.15: resume with data "
        "converted with boneage-make-tfrecords --crop none, or use a new --model_dir"
    )
    assert (model_dir / "derived.json").read_bytes() == before
