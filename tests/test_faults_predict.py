"""Hostile and careless input to predict (and the model directory, the CLI runner, exports).

One class per section: outputs never overwrite inputs; failures are one line; config.json is
checked; special files are skipped without a hang; CSV cells are safe; predict streams.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from boneage_tpu import cli
from boneage_tpu.cli import predict as predict_cli
from boneage_tpu.convert import plan
from boneage_tpu.core import guard, model_dir
from boneage_tpu.core.config import Derived, TrainConfig
from boneage_tpu.evaluate import report
from boneage_tpu.inference import heatmap
from boneage_tpu.modeling import export
from boneage_tpu.predict import inputs as predict_io
from boneage_tpu.predict import job as predict
from boneage_tpu.train import state as train_state
from tests.model_dirs import flip_sensitive_model

pytestmark = pytest.mark.timeout(300)  # A FIFO that blocked open() would hang the test.


def _predict(phantom_run, *args: str) -> int:
    return predict_cli.main(["predict", f"--model={phantom_run['model']}", *map(str, args)])


def _snapshot(root: pathlib.Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (what must survive a refused run)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _error_line(capsys, prog: str = "predict") -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith(f"{prog}: error: "), err
    return err[-1]


@pytest.fixture
def workdir(phantom_run, tmp_path):
    """A copy of the phantom images and labels, so refused runs can be checked byte for byte."""
    images = tmp_path / "images"
    shutil.copytree(phantom_run["images"], images)
    labels = tmp_path / "labels.csv"
    shutil.copy(phantom_run["labels"], labels)
    return {"root": tmp_path, "images": images, "labels": labels}


# 1. Outputs never overwrite inputs.


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (["--heatmaps={images}"], "--heatmaps {images} would overwrite --images"),
        (["--heatmaps={images}/heatmaps"], "would overwrite --images"),
        (["--heatmaps={root}"], "would overwrite"),  # would hold the inputs
        (["--output={labels}"], "--output {labels} would overwrite --labels"),
        (["--output={images}/1.csv"], "would overwrite --images"),
        (["--output={model}/predictions.csv"], "would overwrite the model folder"),
        (["--output={root}/maps/p.csv", "--heatmaps={root}/maps"], "would overwrite --heatmaps"),
        (["--output={images}"], "would overwrite --images"),
    ],
)
def test_outputs_that_overwrite_an_input_are_refused(
    phantom_run,
    workdir,
    capsys,
    outputs,
    message,
):
    names = {**workdir, "model": phantom_run["model"]}
    before = _snapshot(workdir["root"]) | _snapshot(pathlib.Path(phantom_run["model"]))
    argv = [f"--labels={workdir['labels']}", f"--images={workdir['images']}"]
    assert _predict(phantom_run, *argv, *(o.format(**names) for o in outputs)) == 2
    assert message.format(**names) in _error_line(capsys)
    after = _snapshot(workdir["root"]) | _snapshot(pathlib.Path(phantom_run["model"]))
    assert after == before


def test_output_equal_to_an_image_argument_or_of_the_wrong_kind_is_refused(
    phantom_run,
    workdir,
    capsys,
):
    image = next(workdir["images"].glob("*.png"))
    before = image.read_bytes()
    assert _predict(phantom_run, "--sex=F", f"--output={image}", image) == 2
    assert "would overwrite the input image" in _error_line(capsys)
    assert _predict(phantom_run, "--sex=F", f"--heatmaps={image.parent}", image) == 2
    assert "would overwrite the input image" in _error_line(capsys)
    assert image.read_bytes() == before
    (workdir["root"] / "folder.csv").mkdir()
    assert _predict(phantom_run, "--sex=F", f"--output={workdir['root']}/folder.csv", image) == 2
    assert "is a folder: give a file path" in _error_line(capsys)
    assert _predict(phantom_run, "--sex=F", f"--heatmaps={workdir['labels']}", image) == 2
    assert "existing file, not a folder" in _error_line(capsys)


def test_heatmap_names_are_unique_for_repeated_stems(phantom_run, workdir, capsys):
    source = sorted(workdir["images"].glob("*.png"))
    paths = []
    for i, name in enumerate(["a", "a", "a-2", "b"]):
        folder = workdir["root"] / f"d{i}"
        folder.mkdir()
        shutil.copy(source[i], folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    maps = workdir["root"] / "maps"
    assert _predict(phantom_run, "--sex=M", f"--heatmaps={maps}", *paths) == 0
    written = sorted(p.name for p in maps.glob("*.png"))
    assert len(written) == 4 and {"a-2.png", "b.png"} <= set(written), written
    # Stable: the names come from the paths, not from the order of the arguments.
    again = heatmap.file_names(["a", "a-2", "b", "a"], [str(p) for p in paths[1:] + paths[:1]])
    assert sorted(again) == written


@pytest.mark.parametrize(
    ("ids", "sources"),
    [
        (["a", "a", "a"], ["x/a.png", "y/a.png", "z/a.png"]),
        (["a", "a"], ["x/a.png", "x/a.png"]),  # the same file twice
        (["a", "a", "a"], ["1", "2", "3"]),
    ],
)
def test_file_names_are_distinct_by_construction(ids, sources):
    names = heatmap.file_names(ids, sources)
    assert len(set(names)) == len(names) == len(ids)
    # An id that happens to look like a hashed name still gets a distinct name.
    clash = names[0].removesuffix(".png")
    more = heatmap.file_names([*ids, clash], [*sources, "other"])
    assert len(set(more)) == len(more)


# 2. Every failure is one line.


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            tf.errors.FailedPreconditionError(None, None, "/out/x.csv; Is a directory"),
            "failed precondition: /out/x.csv; Is a directory",
        ),
        (tf.errors.InvalidArgumentError(None, None, "name too long: /a/bbbb"), "invalid argument"),
        (tf.errors.ResourceExhaustedError(None, None, "OOM allocating"), "resource exhausted"),
        (IsADirectoryError(21, "Is a directory", "/out/x.csv"), "Is a directory: /out/x.csv"),
        (OSError(28, "No space left on device", "/out", None, "/out2"), "/out -> /out2"),
        (PermissionError(13, "Permission denied"), "Permission denied"),
    ],
)
def test_io_errors_of_a_run_are_one_line_naming_path_and_operation(
    capsys, monkeypatch, error, expected
):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

    def job(config):
        raise error

    assert cli.main("prog", _NoFlags, job, ["prog"], None) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: ") and expected in err, err
    assert "during job" in err  # not our package
    assert f"{cli.TRACEBACK_ENV}=1" in err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    assert cli.main("prog", _NoFlags, job, ["prog"], None) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("prog:")


@dataclasses.dataclass
class _NoFlags:
    """A command without flags (for cli.main)."""


def test_real_io_error_names_the_operation(tmp_path, capsys):
    (tmp_path / "out.csv").mkdir()

    def job(config):
        with tf.io.gfile.GFile(str(tmp_path / "out.csv"), "w") as f:
            f.write("x")

    assert cli.main("prog", _NoFlags, job, ["prog"], None) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "out.csv") in err, err


def test_every_row_skipped_is_one_line(phantom_run, workdir, capsys):
    (workdir["root"] / "bad.csv").write_text("id,boneage,male\nx1,-5,True\nx2,12,maybe\n")
    argv = [f"--labels={workdir['root']}/bad.csv", f"--images={workdir['images']}"]
    assert _predict(phantom_run, *argv) == 1
    line = _error_line(capsys)
    assert "every row of" in line and "was skipped" in line


@pytest.mark.parametrize("name", ["x$1$", "$", "a$\\frac{1}{0}$", "cost$5", "mu_$x^2"])
def test_dollar_signs_in_names_are_text_in_heatmap_titles(name):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 1), dtype=np.uint8)
    png = heatmap.overlay_png(image, rng.random((4, 4)), heatmap.title_text(name, 100.0, 2.0))
    assert Image.open(io.BytesIO(png)).size[0] > 200


def test_special_names_on_the_command_line(phantom_run, workdir, capsys):
    source = next(workdir["images"].glob("*.png"))
    odd = [
        workdir["root"] / "x$1$.png",
        workdir["root"] / os.fsdecode(b"caf\xe9.png"),  # not UTF-8
        workdir["root"] / "red\x1b[31m.png",  # a terminal escape sequence
    ]
    for path in odd:
        shutil.copy(source, path)
    maps = workdir["root"] / "maps"
    assert _predict(phantom_run, "--sex=F", f"--heatmaps={maps}", *odd) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "red\\x1b[31m" in out and "caf\\udce9" in out
    assert len(list(maps.glob("*.png"))) == 3


# 3. config.json is checked like the manifest.


def _config_text(phantom_run) -> str:
    return pathlib.Path(phantom_run["model"], "config.json").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: "", "is not valid JSON"),
        (lambda c: c[: len(c) // 2], "is not valid JSON"),
        (lambda c: "[]", "not a boneage_tpu config (a JSON list"),
        (lambda c: "\xff\xfe", "not valid JSON"),
        (lambda c: json.dumps({"image_size": [224, 224], "lr": 1}), "not a boneage_tpu config"),
        (lambda c: _set(c, "data.image_size", 200000), "image_size must be <= 4096"),
        (lambda c: _set(c, "data.image_size", "299"), 'image_size is "299", expected an integer'),
        (lambda c: _set(c, "model.backbone", "resnet9000"), "backbone must be one of"),
        (lambda c: _set(c, "model.dense_units", ["a"]), "expected a list of integers"),
        (lambda c: _set(c, "model.use_sex", "yes"), "expected true or false"),
        (lambda c: _set(c, "augment.zoom", [2, 1]), "aug_zoom must be min,max"),
    ],
)
def test_bad_config_json_is_one_line(phantom_run, tmp_path, capsys, edit, message):
    run = tmp_path / "run"
    shutil.copytree(phantom_run["model"], run)
    (run / "config.json").write_text(edit(_config_text(phantom_run)), errors="surrogateescape")
    with pytest.raises(model_dir.ModelDirError, match=_escape(message)):
        model_dir.load_config(str(run))
    image = next(phantom_run["images"].glob("*.png"))
    assert predict_cli.main(["predict", f"--model={run}", "--sex=M", str(image)]) == 1
    assert "config.json" in _error_line(capsys)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: "{", "is not valid JSON"),
        (lambda d: _set(d, "data_image_size", 10**6), "data_image_size must be in 0..16384"),
        (lambda d: _set(d, "data_encoding", "webp"), "data_encoding must be one of"),
        (lambda d: _set(d, "data_jpeg_quality", 1000), "data_jpeg_quality must be in 1..100"),
        (lambda d: _set(d, "label_std", 0), "label_std must be > 0"),
        (lambda d: _set(d, "label_mean", "x"), 'label_mean is "x", expected a number'),
        (lambda d: _set(d, "schema_version", 99), "schema version 99"),
    ],
)
def test_bad_derived_json_is_one_line(phantom_run, tmp_path, capsys, edit, message):
    run = tmp_path / "run"
    shutil.copytree(phantom_run["model"], run)
    derived = run / "derived.json"
    derived.write_text(edit(derived.read_text()))
    with pytest.raises(model_dir.ModelDirError, match=_escape(message)):
        model_dir.load_derived(str(run))
    image = next(phantom_run["images"].glob("*.png"))
    assert predict_cli.main(["predict", f"--model_dir={run}", "--sex=M", str(image)]) == 1
    assert "derived.json" in _error_line(capsys)


def test_a_flat_config_json_of_an_older_run_still_loads(phantom_run, tmp_path):
    """Runs before the groups wrote one flat object: flag names plus the derived values."""
    run = tmp_path / "run"
    shutil.copytree(phantom_run["model"], run)
    config = model_dir.load_config(str(run))
    derived = model_dir.load_derived(str(run))
    # Its train_split/val_split were the splits trained on (a fold's, written back).
    old = {**dataclasses.asdict(derived), **cli.flat(config)}
    (run / "config.json").write_text(json.dumps(old))
    (run / "derived.json").unlink()
    assert model_dir.load_config(str(run)) == config
    splits = {"train_split": config.data.train_split, "val_split": config.data.val_split}
    assert model_dir.load_derived(str(run)) == dataclasses.replace(derived, **splits)
    image = next(phantom_run["images"].glob("*.png"))
    assert predict_cli.main(["predict", f"--model_dir={run}", "--sex=M", str(image)]) == 0


def _set(text: str, key: str, value) -> str:
    """Sets a (dotted, nested) key of a JSON object."""
    values = json.loads(text)
    *parents, last = key.split(".")
    inner = values
    for name in parents:
        inner = inner[name]
    inner[last] = value
    return json.dumps(values)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_foreign_checkpoints_without_config_are_not_a_model_directory(tmp_path, capsys):
    run = tmp_path / "other_project"
    ckpt = tf.train.Checkpoint(w=tf.Variable([1.0, 2.0]))
    tf.train.CheckpointManager(ckpt, str(run / "checkpoints"), max_to_keep=1).save()
    with pytest.raises(model_dir.ModelDirError, match="is not a boneage_tpu model directory"):
        model_dir.load_config(str(run))


def test_train_refuses_a_folder_holding_a_foreign_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "bert", "image_size": [1, 2]}))
    before = (tmp_path / "config.json").read_bytes()
    config = TrainConfig.from_flags(data="d", model_dir=str(tmp_path), backbone="tiny")
    with pytest.raises(model_dir.ModelDirError, match="not a boneage_tpu"):
        train_state.check_resume(config, Derived())
    assert (tmp_path / "config.json").read_bytes() == before


# 4. Special files: no hang, itemised skips.


def test_a_fifo_argument_fails_in_one_line_without_hanging(phantom_run, workdir, capsys):
    os.mkfifo(workdir["root"] / "pipe.png")
    assert _predict(phantom_run, "--sex=M", workdir["root"] / "pipe.png") == 1
    assert "FIFO (named pipe), not a regular file" in _error_line(capsys)
    good = next(workdir["images"].glob("*.png"))
    os.symlink("/dev/zero", workdir["root"] / "zero.png")
    args = ["--sex=M", "--skip_unreadable", good, workdir["root"] / "zero.png"]
    assert _predict(phantom_run, *args) == 0
    captured = capsys.readouterr()
    assert "character device, not a regular file" in captured.err
    assert len(captured.out.strip().splitlines()) == 2


def test_special_files_in_images_are_itemised_skips(phantom_run, workdir, capsys):
    first = sorted(workdir["images"].glob("*.png"))[0]
    first.unlink()
    os.mkfifo(first)  # a row's image is a FIFO
    second = sorted(workdir["images"].glob("*.png"))[1]
    second.unlink()
    os.symlink("/dev/zero", second)
    argv = [f"--labels={workdir['labels']}", f"--images={workdir['images']}", "--skip_unreadable"]
    assert _predict(phantom_run, *argv) == 0
    captured = capsys.readouterr()
    assert "FIFO" in captured.err and "character device" in captured.err
    assert len(captured.out.strip().splitlines()) == 1 + 4


# 5. CSV cells and names.


def test_formula_ids_are_neutralised_and_numbers_stay_numbers(phantom_run, workdir):
    source = sorted(workdir["images"].glob("*.png"))
    names = ["=2+5", "@SUM(1+1)", "+1", "-3", "plain"]
    paths = []
    for src, name in zip(source, names, strict=False):
        paths.append(workdir["root"] / f"{name}.png")
        shutil.copy(src, paths[-1])
    out = workdir["root"] / "out.csv"
    assert _predict(phantom_run, "--sex=M", f"--output={out}", *paths) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["'=2+5", "'@SUM(1+1)", "'+1", "'-3", "plain"]
    assert all(not r["path"].startswith(guard.FORMULA_PREFIXES) for r in rows)
    assert all(np.isfinite(float(r["predicted_months"])) for r in rows)
    text = report.predictions_csv(
        ["=cmd|' /C calc'!A0", "7"], np.array([1, 0]), np.array([10.0, 20.0]), np.array([6.8, 21])
    )
    table = list(csv.DictReader(io.StringIO(text)))
    assert table[0]["id"] == "'=cmd|' /C calc'!A0" and table[1]["id"] == "7"
    assert float(table[0]["error"]) == pytest.approx(-3.2)  # a number, not neutralised


@pytest.mark.parametrize("name", ["test\n", "test\r\n", "\ttest", "te st", "tést", "a/b", ""])
def test_split_names_are_checked_whole(name):
    with pytest.raises(plan.ConvertError, match="must be letters, digits or '_'"):
        plan.check_split_name(name)


def test_valid_split_names_pass():
    for name in ("test", "fold_2", "A9"):
        plan.check_split_name(name)


# 6. predict streams.


def test_results_are_written_chunk_by_chunk(phantom_run, workdir, monkeypatch):
    monkeypatch.setattr(predict, "MIN_CHUNK", 2)
    images = sorted(str(p) for p in workdir["images"].glob("*.png"))
    chunks = []
    config = predict.PredictConfig(
        model_dir=phantom_run["model"], paths=tuple(images[:5]), sex="F", batch_size=1
    )
    monkeypatch.setattr(predict, "CHUNK_BATCHES", 2)
    rows = predict.run(config, lambda part, labeled: chunks.append([r["id"] for r in part]))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [r["id"] for r in rows] == [i for c in chunks for i in c]


def test_a_partial_csv_survives_a_later_failure(phantom_run, workdir, monkeypatch, capsys):
    monkeypatch.setattr(predict, "MIN_CHUNK", 2)
    monkeypatch.setattr(predict, "CHUNK_BATCHES", 1)
    good = sorted(workdir["images"].glob("*.png"))[:2]
    (workdir["root"] / "junk.png").write_bytes(b"not an image")
    out = workdir["root"] / "out.csv"
    args = ["--sex=F", "--batch_size=1", f"--output={out}", *good, workdir["root"] / "junk.png"]
    assert _predict(phantom_run, *args) == 1
    assert "cannot read 1 of 3 images" in _error_line(capsys)
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_images_without_a_row_are_one_summary_line(phantom_run, workdir, capsys):
    for i in range(7):
        shutil.copy(next(workdir["images"].glob("*.png")), workdir["images"] / f"extra{i}.png")
    argv = [f"--labels={workdir['labels']}", f"--images={workdir['images']}"]
    assert _predict(phantom_run, *argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("not predicted: 7 image(s)"), err


def test_progress_is_shown_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = predict_io.Progress(3)
    progress.update(2)
    progress.close()
    assert "predict: 2/3 images" in capsys.readouterr().err


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "saved_model"
    export.export_saved_model(flip_sensitive_model(32), 32, str(path))
    png = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(png, "PNG")
    return tf.saved_model.load(str(path)).signatures["serving_default"], png.getvalue()


@pytest.mark.parametrize(
    ("count", "male", "message"),
    [
        (0, [], "image_bytes is empty"),
        (1, [float("nan")], "male must be 0 (female) to 1 (male)"),
        (1, [1e6], "male must be 0 (female) to 1 (male)"),
        (2, [-1.0, 0.0], "male must be 0 (female) to 1 (male)"),
        (2, [1.0], "male must have one value per image"),
    ],
)
def test_saved_model_rejects_empty_batches_and_bad_sex(saved_model, count, male, message):
    serve, png = saved_model
    with pytest.raises(tf.errors.InvalidArgumentError, match=_escape(message)):
        serve(image_bytes=tf.constant([png] * count, tf.string), male=tf.constant(male, tf.float32))
    months = serve(image_bytes=tf.constant([png, png]), male=tf.constant([0.0, 1.0]))
    assert np.all(np.isfinite(months["boneage_months"].numpy()))
