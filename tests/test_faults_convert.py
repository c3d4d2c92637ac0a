"""Faults in conversion: one bad item is a skip, a full disk or a bad manifest is one line."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from boneage_tpu.cli import make_tfrecords as make_tfrecords_cmd
from boneage_tpu.cli import verify_tfrecords as verify_tfrecords_cmd
from boneage_tpu.convert import manifest as convert_manifest
from boneage_tpu.convert import shards as convert_shards
from boneage_tpu.core import schema
from boneage_tpu.data import layouts
from tests.helpers import convert, png_dataset, read_records, shard_bytes


def _cli(csv, folder, out, *extra):
    argv = ["make_tfrecords", f"--labels={csv}", f"--images={folder}", f"--output={out}"]
    return make_tfrecords_cmd.main([*argv, "--num_workers=0", "--quiet", *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_tfrecords: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_and_implausible_items_are_itemised_skips(tmp_path, workers):
    csv, folder, _ = png_dataset(tmp_path, n=8)
    os.remove(folder / "1001.png")
    os.symlink(folder / "1001.png", folder / "1001.png")  # ELOOP: an OSError, not "missing".
    Image.fromarray(np.full((60, 50), 255, np.uint8)).save(folder / "1002.png")  # Blank.
    Image.fromarray(np.full((1, 1), 90, np.uint8)).save(folder / "1003.png")  # 1x1.
    manifest = convert(csv, folder, tmp_path / "out", num_workers=workers, split_name="all")
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert "cannot read" in reasons["1001"] and "Errno 40" in reasons["1001"]
    assert "near-constant image" in reasons["1002"]
    assert "too small for a radiograph: 1x1" in reasons["1003"]
    assert manifest["rows_in"] == 8 == manifest["records_written"] + manifest["rows_skipped"]
    assert len(read_records(tmp_path / "out", "all")) == manifest["records_written"] == 5


def test_skip_reasons_with_newlines_stay_one_line_in_the_summary():
    entry = layouts.skip(3, "a", "a.png", "corrupt image:\nline two\r\n  line three")
    assert entry["reason"] == "corrupt image: line two line three"
    manifest = {
        "splits": {},
        "rows_in": 2,
        "records_written": 0,
        "rows_skipped": 2,
        "images_without_row": 0,
        "skipped": [entry, {**entry, "row": 4, "reason": "raw\nreason from an old manifest"}],
    }
    lines = convert_manifest.summary(manifest).splitlines()
    assert lines[-2].endswith("corrupt image: line two line three")
    assert lines[-1].endswith("raw reason from an old manifest") and len(lines) == 5


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_manifest_is_readable_under_the_umask(tmp_path, umask):
    csv, folder, _ = png_dataset(tmp_path, n=4)
    old = os.umask(umask)
    try:
        convert(csv, folder, tmp_path / "out", split_name="all")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "out" / schema.MANIFEST_NAME).stat().st_mode)
    assert mode == 0o666 & ~umask


@pytest.mark.parametrize(
    "error, message",
    [
        (tf.errors.ResourceExhaustedError(None, None, "No space left on device"), "out of space"),
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    ],
)
def test_disk_full_is_one_line_naming_the_output_and_resumes(
    tmp_path, capsys, monkeypatch, error, message
):
    csv, folder, _ = png_dataset(tmp_path, n=12)
    options = ["--num_shards=3", "--encoding=png", "--image_size=24", "--split_name=all"]
    assert _cli(csv, folder, tmp_path / "ref", *options) == 0
    real_write, calls = convert_shards.write_text_atomic, []

    def full_after_one_shard(path, text):
        calls.append(path)
        if path.endswith(".tfrecord.json") and len(calls) > 2:  # plan + first shard's info.
            raise error
        real_write(path, text)

    monkeypatch.setattr(convert_shards, "write_text_atomic", full_after_one_shard)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _cli(csv, folder, out, *options) == 1
    err = _one_line(capsys)
    assert message in err and str(out) in err and "rerun the same command to resume" in err
    assert not (out / schema.MANIFEST_NAME).exists()
    monkeypatch.setattr(convert_shards, "write_text_atomic", real_write)
    assert _cli(csv, folder, out, *options) == 0  # Resumes; same bytes as uninterrupted.
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")


def test_manifest_that_is_not_json_is_one_line_naming_it(tmp_path, capsys):
    csv, folder, _ = png_dataset(tmp_path, n=4)
    out = tmp_path / "out"
    convert(csv, folder, out, split_name="all")
    (out / schema.MANIFEST_NAME).write_text('{"schema_version": 1, "spl')  # Cut short.
    assert _cli(csv, folder, out, "--split_name=all") == 1
    err = _one_line(capsys)
    assert f"{out / schema.MANIFEST_NAME} is not valid JSON" in err and "--overwrite" in err
    with pytest.raises(schema.ManifestError, match="is not valid JSON"):
        schema.read_manifest(str(out))
    assert _cli(csv, folder, out, "--split_name=all", "--overwrite") == 0
    assert json.loads((out / schema.MANIFEST_NAME).read_text())["records_written"] == 4


def test_verify_names_corrupt_truncated_and_missing_shards(tmp_path, capsys):
    csv, folder, _ = png_dataset(tmp_path, n=12)
    out = tmp_path / "out"
    convert(csv, folder, out, num_shards=3, split_name="all", encoding="png")
    assert verify_tfrecords_cmd.main(["verify_tfrecords", str(out)]) == 0
    assert "3 of 3 shard(s) match" in capsys.readouterr().out
    names = sorted(shard_bytes(out))
    data = bytearray((out / names[0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / names[0]).write_bytes(bytes(data))
    (out / names[1]).write_bytes((out / names[1]).read_bytes()[:100])
    (out / names[2]).unlink()
    assert make_tfrecords_cmd.main(["make_tfrecords", f"--output={out}", "--verify"]) == 1
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0] == f"BAD {out / names[0]}: sha256 differs from the manifest (corrupted)"
    assert lines[1].startswith(f"BAD {out / names[1]}: 100 bytes, the manifest says")
    assert lines[2] == f"BAD {out / names[2]}: missing"
    assert printed.err.strip() == (
        f"make_tfrecords: error: 3 shard(s) in {out} do not match manifest.json: reconvert with "
        "--overwrite"
    )
    assert verify_tfrecords_cmd.main(["verify_tfrecords", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        "verify_tfrecords: error: 3 shard(s) do not match the manifest"
    )
    assert verify_tfrecords_cmd.main(["verify_tfrecords", str(tmp_path / "nope")]) == 1
    assert "no manifest.json in" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, flag, message",
    [
        ("make_tfrecords", "--num_workers=-1", "--num_workers must be >= 0, got -1"),
        ("make_tfrecords", "--image_size=0", "--image_size must be >= 1, got 0"),
        ("evaluate", "--batch_size=-4", "--batch_size must be >= 0, got -4"),
        ("evaluate", "--virtual_cpus=-1", "--virtual_cpus must be >= 0, got -1"),
        ("predict", "--batch_size=0", "--batch_size must be >= 1, got 0"),
    ],
)
def test_other_commands_check_flag_ranges_first(tmp_path, capsys, command, flag, message):
    from boneage_tpu.cli import evaluate, predict

    mains = {
        "make_tfrecords": make_tfrecords_cmd.main,
        "evaluate": evaluate.main,
        "predict": predict.main,
    }
    args = {
        "make_tfrecords": ["--labels=a.csv", "--images=i", f"--output={tmp_path}/out"],
        "evaluate": [f"--model_dir={tmp_path}/m", f"--data={tmp_path}/d"],
        "predict": [f"--model={tmp_path}/m", "x.png"],
    }[command]
    assert mains[command]([command, *args, flag]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"{command}: error: {message}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["images", "inside_images", "labels"])
def test_output_that_is_an_input_is_refused(tmp_path, capsys, where):
    csv, folder, _ = png_dataset(tmp_path, n=3)
    out = {"images": folder, "inside_images": folder / "records", "labels": csv}[where]
    before = sorted(p.name for p in folder.iterdir())
    assert _cli(csv, folder, out) == 2
    assert "would overwrite" in _one_line(capsys)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_output_may_hold_the_inputs(tmp_path):
    csv, folder, _ = png_dataset(tmp_path, n=3)
    # tmp_path holds the CSV and the images folder; shards and manifest cannot clash with them.
    assert _cli(csv, folder, tmp_path) == 0
    assert (tmp_path / schema.MANIFEST_NAME).exists()
