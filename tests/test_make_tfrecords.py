"""Tests for tools.make_tfrecords: records, manifest, bad inputs, splits, resume, TFDS interop."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from boneage_tpu.cli import make_tfrecords as make_tfrecords_cmd
from boneage_tpu.convert import job as make_tfrecords
from boneage_tpu.convert import plan
from boneage_tpu.core import schema
from boneage_tpu.data import crop, images, layouts
from boneage_tpu.data.layouts import ConvertError
from tests.hands import write_hand_dataset
from tests.helpers import (
    convert,
    gradient_image,
    png_dataset,
    read_records,
    shard_bytes,
    without_time,
    write_csv,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_convert_writes_records_manifest_and_summary(tmp_path, capsys):
    csv, folder, labels = png_dataset(tmp_path)
    out = tmp_path / "out"
    manifest = convert(csv, folder, out, image_size=32, encoding="png", quiet=False)
    assert manifest == schema.read_manifest(str(out))
    assert manifest["schema_version"] == schema.SCHEMA_VERSION and manifest["layout"] == "kaggle"
    assert (manifest["image_size"], manifest["encoding"], manifest["jpeg_quality"]) == (
        32,
        "png",
        95,
    )
    assert manifest["source_csv_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert manifest["rows_in"] == manifest["records_written"] == 24 and manifest["skipped"] == []
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 22, "val": 2}
    seen = set()
    for split, info in manifest["splits"].items():
        names = [s["name"] for s in info["shards"]]
        assert names == [schema.shard_name(split, i, len(names)) for i in range(len(names))]
        for shard in info["shards"]:
            data = (out / shard["name"]).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (
                shard["bytes"],
                shard["sha256"],
            )
        records = read_records(out, split)
        assert (
            len(records)
            == info["count"]
            == info["labeled"]
            == sum(s["records"] for s in info["shards"])
        )
        for r in records:
            image_id = r["id"].decode()
            age, male = labels[image_id]
            assert (r["boneage"], r["male"], r["has_label"]) == (age, male, 1)
            assert r["stratum"] == schema.stratum(age, male)
            assert (r["height"], r["width"], r["encoding"]) == (32, 25, b"png")
            stored = images.decode(r["image"], "png", 32, 25)
            expected = images.resize_longest_side(gradient_image(int(image_id) - 1000), 32)
            np.testing.assert_array_equal(stored, expected)
            seen.add(image_id)
        assert (
            sum(info["counts_by_stratum"])
            == sum(info["counts_by_age_band"].values())
            == info["count"]
        )
        assert sum(info["counts_by_sex"].values()) == info["count"]
    assert seen == set(labels)
    train_ages = [labels[r["id"].decode()][0] for r in read_records(out, "train")]
    stats = manifest["label_stats"]
    assert stats["split"] == "train"
    assert stats["mean_months"] == pytest.approx(np.mean(train_ages))
    assert stats["std_months"] == pytest.approx(np.std(train_ages))
    assert not (out / ".convert").exists()
    printed = capsys.readouterr().out
    assert "train" in printed and "rows in 24 = records written 24 + rows skipped 0" in printed


@pytest.mark.shared
def test_real_rsna_sample_pixels_match(rsna_sample_dir, tmp_path):
    csv = rsna_sample_dir / "boneage-training-dataset.csv"
    folder = rsna_sample_dir / "boneage-training-dataset"
    manifest = convert(csv, folder, tmp_path / "out", num_workers=2)
    assert manifest["records_written"] == 12 and manifest["skipped"] == []
    records = read_records(tmp_path / "out", "train") + read_records(tmp_path / "out", "val")
    assert {"1578", "2110"} <= {r["id"].decode() for r in records}  # The palette PNGs.
    for r in records:
        original = images.read_grayscale(str(folder / f"{r['id'].decode()}.png"))
        expected = images.resize_longest_side(original, 512)
        stored = images.decode(r["image"], "jpeg", r["height"], r["width"])
        assert stored.shape == expected.shape == (512, 394)
        assert np.corrcoef(stored.ravel(), expected.ravel())[0, 1] >= 0.99, r["id"]


def _bad_inputs(tmp_path: pathlib.Path, bom: bool, crlf: bool):
    """A dataset with every kind of bad input; returns (csv, folder, expected reason by id)."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i, image_id in enumerate(["g0", "g1", "g2", "g3", "g4", "g5", "dup", "conf"]):
        Image.fromarray(gradient_image(i)).save(folder / f"{image_id}.png")
    png = (folder / "g0.png").read_bytes()
    (folder / "corrupt.png").write_bytes(b"this is not a png" * 20)
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(gradient_image(9)).save(folder / "orphan.png")
    lines = [
        "id,boneage,male",
        *[f"g{i},{20 * i + 10},{['True', 'False', '1', '0', 'M', 'F'][i]}" for i in range(6)],
        "corrupt,50,True",
        "truncated,60,False",
        "empty,70,True",
        "missing,80,False",
        "dup,90,True",
        "dup,90,True",
        "conf,100,True",
        "conf,101,True",
        "nonnum,abc,True",
        "neg,-5,False",
        "old,250,True",
        "nan,nan,True",
        "nosex,30,maybe",
        "noage,,True",
        "a/b,40,True",
        "..up,40,True",
        "short,12",
    ]
    expected = {
        "corrupt": "unrecognised",
        "truncated": "corrupt or truncated",
        "empty": "empty file",
        "missing": "missing image file",
        "dup": "duplicate id, first seen on line 12",
        "conf": "duplicate id with conflicting values",
        "nonnum": "non-numeric bone age",
        "neg": "negative bone age",
        "old": "above 240",
        "nan": "not a finite number",
        "nosex": "unknown sex value 'maybe'",
        "noage": "missing bone age",
        "a/b": "path separator",
        "..up": "path separator or '..'",
        "short": "row has 2 fields",
        "orphan": "image has no CSV row",
    }
    return write_csv(tmp_path / "labels.csv", lines, bom=bom, crlf=crlf), folder, expected


def test_every_bad_input_is_skipped_with_a_reason(tmp_path, capsys):
    baseline = None
    for bom, crlf in [(False, False), (True, False), (False, True), (True, True)]:
        case = tmp_path / f"bom{bom:d}crlf{crlf:d}"
        case.mkdir()
        csv, folder, expected = _bad_inputs(case, bom, crlf)
        manifest = convert(csv, folder, case / "out", encoding="png", quiet=False)
        printed = capsys.readouterr().out
        rows_in = len(csv.read_bytes().splitlines()) - 1
        assert manifest["rows_in"] == rows_in == 23
        assert manifest["records_written"] + manifest["rows_skipped"] == rows_in
        assert len(manifest["skipped"]) == manifest["rows_skipped"] + manifest["images_without_row"]
        assert manifest["images_without_row"] == 1
        written = {
            r["id"].decode() for s in manifest["splits"] for r in read_records(case / "out", s)
        }
        assert written == {"g0", "g1", "g2", "g3", "g4", "g5", "dup"}
        reasons = {(s["id"], s["reason"]) for s in manifest["skipped"]}
        for image_id, reason in expected.items():
            assert any(i == image_id and reason in r for i, r in reasons), (image_id, reasons)
            assert reason in printed
        assert sum(1 for s in manifest["skipped"] if s["id"] == "conf") == 2
        assert sum(1 for s in manifest["skipped"] if s["id"] == "dup") == 1
        by_id = {s["id"]: s for s in manifest["skipped"]}
        assert by_id["orphan"]["row"] is None and by_id["orphan"]["path"].endswith("orphan.png")
        assert by_id["corrupt"]["row"] == 8 and by_id["corrupt"]["path"].endswith("corrupt.png")
        # A BOM or CRLF changes nothing but the CSV checksum.
        shards = [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]
        skipped = [(s["row"], s["id"], s["reason"]) for s in manifest["skipped"]]
        baseline = baseline or (shards, skipped)
        assert (shards, skipped) == baseline


def test_sex_values_and_rsna_layouts(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(gradient_image(i)).save(folder / f"{i}.png")
    sexes = ["True", "false", "1", "0", "M", "f"]
    validation = write_csv(
        tmp_path / "val.csv",
        ["Image ID,male,Bone Age (months)"]
        + [f"{i},{s},{10 * i + 5}" for i, s in enumerate(sexes)],
    )
    manifest = convert(validation, folder, tmp_path / "v", split_name="holdout")
    assert manifest["layout"] == "rsna_validation" and list(manifest["splits"]) == ["holdout"]
    assert manifest["label_stats"] == pytest.approx(
        {
            "mean_months": 30.0,
            "std_months": float(np.std([5, 15, 25, 35, 45, 55])),
            "split": "holdout",
        }
    )
    records = {r["id"].decode(): r for r in read_records(tmp_path / "v", "holdout")}
    assert [int(records[str(i)]["male"]) for i in range(6)] == [1, 0, 1, 0, 1, 0]
    test = write_csv(
        tmp_path / "test.csv", ["Case ID,Sex"] + [f"{i},{'MF'[i % 2]}" for i in range(6)]
    )
    manifest = convert(test, folder, tmp_path / "t")
    assert manifest["layout"] == "rsna_test" and list(manifest["splits"]) == ["test"]
    assert (
        manifest["splits"]["test"]["labeled"] == 0
        and manifest["label_stats"]["mean_months"] is None
    )
    for r in read_records(tmp_path / "t", "test"):
        assert (r["has_label"], r["boneage"], r["stratum"]) == (0, schema.NO_LABEL, -1)
    partial = write_csv(
        tmp_path / "partial.csv",
        ["Case ID,Sex,Ground truth bone age (months)"]
        + [f"{i},M,{'' if i < 2 else 99}" for i in range(6)],
    )
    manifest = convert(partial, folder, tmp_path / "p")
    assert (manifest["splits"]["test"]["count"], manifest["splits"]["test"]["labeled"]) == (6, 4)


def test_split_is_stratified_and_deterministic(tmp_path):
    rows = [
        layouts.Row(i, f"{i:04d}", float(i * 7 % 240), bool(i % 2), f"{i}.png") for i in range(300)
    ]
    split = plan.assign_splits(rows, val_fraction=0.2, seed=3, split_name="")
    assert len(split["val"]) == 60 and len(split["train"]) == 240
    again = plan.assign_splits(list(reversed(rows)), val_fraction=0.2, seed=3, split_name="")
    assert split == again  # Row order in the CSV does not matter.
    other = plan.assign_splits(rows, val_fraction=0.2, seed=4, split_name="")
    assert {r.image_id for r in other["val"]} != {r.image_id for r in split["val"]}
    for stratum in range(schema.NUM_STRATA):
        total = sum(r.stratum == stratum for r in rows)
        in_val = sum(r.stratum == stratum for r in split["val"])
        assert abs(in_val - 0.2 * total) <= 1, stratum
    assert [r.image_id for r in split["train"]] != sorted(r.image_id for r in split["train"])
    single = plan.assign_splits(rows, val_fraction=0.2, seed=3, split_name="all_2")
    assert list(single) == ["all_2"] and len(single["all_2"]) == 300
    with pytest.raises(ConvertError, match="split name"):
        plan.assign_splits(rows, val_fraction=0.2, seed=3, split_name="a-b")
    assert list(plan.assign_splits(rows, val_fraction=0.0, seed=3, split_name="")) == ["train"]


def test_mixed_formats_subfolders_and_ambiguous_ids(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(gradient_image(0)).save(folder / "a.png")
    Image.fromarray(gradient_image(1)).convert("RGB").save(folder / "sub" / "b.JPG", quality=95)
    Image.fromarray(gradient_image(2).astype(np.uint16) * 257).save(folder / "c.png")
    Image.fromarray(gradient_image(3)).save(folder / "d.png")
    Image.fromarray(gradient_image(3)).save(folder / "sub" / "d.jpg")
    csv = write_csv(tmp_path / "l.csv", ["id,boneage,male", "a,10,1", "b,20,0", "c,30,1", "d,40,0"])
    manifest = convert(csv, folder, tmp_path / "out", split_name="x")
    assert {r["id"].decode() for r in read_records(tmp_path / "out", "x")} == {"a", "b", "c"}
    assert [s["reason"] for s in manifest["skipped"]] == [
        "several image files for this id: d.png, d.jpg"
    ]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty_csv", "labels CSV is empty"),
        ("header_only", "header but no data rows"),
        ("missing_column", "lacks column(s) ['male']"),
        ("unknown_layout", "cannot detect the CSV layout"),
        ("no_csv", "labels CSV not found"),
        ("no_images", "no images"),
        ("no_images_dir", "images folder not found"),
        ("unwritable", "is not writable"),
        ("all_skipped", "nothing to convert: all 2 CSV rows are skipped"),
    ],
)
def test_fatal_errors_exit_nonzero_with_one_line(tmp_path, capsys, setup, message):
    csv, folder, _ = png_dataset(tmp_path, n=3)
    out, extra = tmp_path / "out", []
    if setup == "empty_csv":
        csv.write_bytes(b"")
    elif setup == "header_only":
        write_csv(csv, ["id,boneage,male"])
    elif setup == "missing_column":
        write_csv(csv, ["id,boneage", "1000,12"])
    elif setup == "unknown_layout":
        write_csv(csv, ["name,age", "1000,12"])
    elif setup == "no_csv":
        csv = tmp_path / "nope.csv"
    elif setup == "no_images":
        folder = tmp_path / "empty"
        folder.mkdir()
        (folder / "notes.txt").write_text("no images here")
    elif setup == "no_images_dir":
        folder = tmp_path / "nope"
    elif setup == "unwritable":
        out = tmp_path / "a_file" / "out"
        (tmp_path / "a_file").write_text("a file, not a folder")
    elif setup == "all_skipped":
        write_csv(csv, ["id,boneage,male", "1000,-1,True", "1001,12,maybe"])
    argv = [
        "make_tfrecords",
        f"--labels={csv}",
        f"--images={folder}",
        f"--output={out}",
        "--num_workers=0",
    ]
    assert make_tfrecords_cmd.main(argv + extra) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_tfrecords: error: ") and message in err and "\n" not in err
    assert not (out / schema.MANIFEST_NAME).exists()


def test_cli_usage_errors(capsys):
    assert make_tfrecords_cmd.main(["make_tfrecords", "--labels=x.csv"]) == 2
    assert "missing required flag(s): --images, --output" in capsys.readouterr().err
    assert (
        make_tfrecords_cmd.main(
            ["make_tfrecords", "--encoding=gif", "--labels=a", "--images=b", "--output=c"]
        )
        == 2
    )
    assert (
        make_tfrecords_cmd.main(
            ["make_tfrecords", "stray", "--labels=a", "--images=b", "--output=c"]
        )
        == 2
    )
    assert "unexpected arguments: ['stray']" in capsys.readouterr().err
    argv = ["make_tfrecords", "--jpeg_quality=0", "--labels=a", "--images=b", "--output=c"]
    assert make_tfrecords_cmd.main(argv) == 2
    assert "--jpeg_quality must be >= 1, got 0" in capsys.readouterr().err
    assert make_tfrecords_cmd.main(["make_tfrecords", "--help"]) == 0
    assert "--target_shard_mb" in capsys.readouterr().out


def test_strict_makes_any_skip_fatal(tmp_path):
    csv, folder, _ = png_dataset(tmp_path, n=5)
    (folder / "1002.png").write_bytes(b"broken")
    with pytest.raises(ConvertError, match=r"--strict: line 4, id 1002 .*unrecognised"):
        convert(csv, folder, tmp_path / "out", strict=True, split_name="all")
    assert not (tmp_path / "out" / schema.MANIFEST_NAME).exists()
    (folder / "1002.png").unlink()
    with pytest.raises(ConvertError, match="--strict: 1 input.*missing image file"):
        convert(csv, folder, tmp_path / "out2", strict=True)
    assert not (tmp_path / "out2").exists()  # Planning errors come before any write.


class _Stop(Exception):
    pass


def test_stopped_conversion_resumes_to_identical_bytes(tmp_path, capsys):
    csv, folder, _ = png_dataset(tmp_path, n=20)
    options = {"num_shards": 4, "encoding": "png", "image_size": 24}
    reference = convert(csv, folder, tmp_path / "ref", **options)
    out, done = tmp_path / "out", []

    def stop_after_two(name):
        done.append(name)
        if len(done) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        convert(csv, folder, out, on_shard_done=stop_after_two, **options)
    assert not (out / schema.MANIFEST_NAME).exists()
    assert sorted(shard_bytes(out)) == sorted(done)
    (out / ".convert" / "train-00002-of-00004.tfrecord.tmp").write_bytes(b"half a shard")
    (out / ".convert" / f"{done[1]}.json").unlink()  # Killed before its info was saved.
    redone = []
    manifest = convert(csv, folder, out, on_shard_done=redone.append, **options)
    assert done[0] not in redone and done[1] in redone
    assert len(redone) == len(shard_bytes(reference and tmp_path / "ref")) - 1
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    assert without_time(manifest) == without_time(reference)
    assert not (out / ".convert").exists()
    # A finished conversion is not redone; other options need --overwrite.
    capsys.readouterr()
    assert convert(csv, folder, out, quiet=False, **options) == manifest
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(ConvertError, match="--overwrite"):
        convert(csv, folder, out, **{**options, "num_shards": 2})
    redo = convert(csv, folder, out, overwrite=True, **{**options, "num_shards": 2})
    assert len(redo["splits"]["train"]["shards"]) == 2
    assert sorted(shard_bytes(out)) == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
        "val-00000-of-00002.tfrecord",
        "val-00001-of-00002.tfrecord",
    ]


def test_unfinished_conversion_with_other_options_is_refused(tmp_path):
    csv, folder, _ = png_dataset(tmp_path, n=6)

    def stop(name):
        raise _Stop

    with pytest.raises(_Stop):
        convert(csv, folder, tmp_path / "out", on_shard_done=stop)
    with pytest.raises(ConvertError, match="unfinished conversion of other inputs"):
        convert(csv, folder, tmp_path / "out", image_size=64)


@pytest.mark.slow
def test_killed_cli_resumes_to_identical_bytes(tmp_path):
    csv, folder, _ = png_dataset(tmp_path, n=12)
    args = ["--num_shards=3", "--encoding=png", "--image_size=24", "--num_workers=2", "--quiet"]
    convert(csv, folder, tmp_path / "ref", num_shards=3, encoding="png", image_size=24)
    command = [
        sys.executable,
        "-m",
        "tools.make_tfrecords",
        f"--labels={csv}",
        f"--images={folder}",
    ]
    command += [f"--output={tmp_path / 'out'}", *args]
    env = {**os.environ, make_tfrecords.KILL_ENV: "2"}
    killed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, check=False)
    assert killed.returncode == -9
    assert len(shard_bytes(tmp_path / "out")) == 2
    assert not (tmp_path / "out" / schema.MANIFEST_NAME).exists()
    resumed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")


def test_output_is_a_tfds_folder_dataset(tmp_path):
    import tensorflow_datasets as tfds

    csv, folder, labels = png_dataset(tmp_path, n=12)
    manifest = convert(csv, folder, tmp_path / "out", val_fraction=0.25)
    builder = tfds.builder_from_directory(str(tmp_path / "out"))
    for split in ("train", "val"):
        assert builder.info.splits[split].num_examples == manifest["splits"][split]["count"]
        records = list(tfds.as_numpy(builder.as_dataset(split=split)))
        ids = sorted(r["id"].decode() for r in records)
        assert ids == sorted(r["id"].decode() for r in read_records(tmp_path / "out", split))
        for r in records:
            assert r["boneage"] == labels[r["id"].decode()][0]


def test_workers_give_the_same_bytes_as_in_process(tmp_path):
    csv, folder, _ = png_dataset(tmp_path, n=10)
    convert(csv, folder, tmp_path / "a", num_workers=0, num_shards=2)
    convert(csv, folder, tmp_path / "b", num_workers=2, num_shards=2)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_shard_count_from_size_target(tmp_path):
    csv, folder, _ = png_dataset(tmp_path, n=40)
    small = convert(csv, folder, tmp_path / "a", encoding="raw", image_size=40, val_fraction=0.0)
    assert len(small["splits"]["train"]["shards"]) == make_tfrecords.MIN_SHARDS
    # Raw 40x31 records are ~1.5 KB: a 3 KB target needs ~20 shards, more than the minimum.
    sized = convert(csv, folder, tmp_path / "b", encoding="raw", image_size=40, val_fraction=0.0,
                     target_shard_mb=0.003)  # fmt: skip
    shards = sized["splits"]["train"]["shards"]
    assert make_tfrecords.MIN_SHARDS < len(shards) <= 40
    assert max(s["bytes"] for s in shards) < 2 * 3000
    capped = convert(csv, folder, tmp_path / "c", num_shards=100, val_fraction=0.0)
    assert len(capped["splits"]["train"]["shards"]) == 40


def test_benchmark_reports_the_contract_keys(tmp_path):
    from tools import benchmark_convert

    csv, folder, _ = png_dataset(tmp_path, n=3)
    result = benchmark_convert.run(
        str(csv), str(folder), 2, 32, "jpeg", 1, str(tmp_path / "b.json")
    )
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved == result and result["images"] == 6
    assert {"convert_img_s", "png_decode_img_s_per_core", "cores", "convert_vs_floor"} <= set(saved)
    expected = saved["convert_img_s"] / (saved["png_decode_img_s_per_core"] * saved["cores"])
    assert saved["convert_vs_floor"] == pytest.approx(expected, abs=2e-3)


def test_summary_shortens_long_skip_lists():
    from boneage_tpu.convert import manifest as convert_output

    skipped = [
        {"row": i + 2, "id": str(i), "path": "", "reason": "missing image file"} for i in range(60)
    ]
    manifest = {
        "splits": {},
        "rows_in": 60,
        "records_written": 0,
        "rows_skipped": 60,
        "images_without_row": 0,
        "skipped": skipped,
    }
    text = convert_output.summary(manifest)
    assert "line 51" in text and "line 52 " not in text
    assert "... 10 more in manifest.json" in text
    assert "most common reasons: 60 x missing image file" in text


def test_object_store_code_paths_via_file_urls(tmp_path):
    # "file://" URLs take the object-store branches (reader threads; no temp + rename) through
    # tf.io.gfile without needing a GCS emulator.
    from boneage_tpu.convert import shards as convert_write

    csv, folder, _ = png_dataset(tmp_path, n=8)
    (folder / "1003.png").write_bytes(b"")
    local = convert(csv, folder, tmp_path / "local", num_shards=2)
    remote = convert(
        f"file://{csv}", f"file://{folder}", tmp_path / "remote", num_shards=2, num_workers=2
    )
    assert shard_bytes(tmp_path / "local") == shard_bytes(tmp_path / "remote")
    assert [s["reason"] for s in remote["skipped"]] == [s["reason"] for s in local["skipped"]]
    state = convert_write.OutputState(f"file://{tmp_path / 'direct'}")
    state.prepare()
    row = layouts.Row(2, "a", 12.0, True, "a.png")
    job = convert_write.ShardJob("train", "train-00000-of-00001.tfrecord", (row,))
    info = state.write_shard(
        job, iter([(row, (b"\x07" * 6, 2, 3, ""))]), "raw", False, lambda: None
    )
    assert info["records"] == 1 and state.completed(job) == info
    assert sorted(p.name for p in (tmp_path / "direct" / ".convert").iterdir()) == [
        "train-00000-of-00001.tfrecord.json"
    ]
    with pytest.raises(ConvertError, match="TFDS metadata"):
        convert(csv, folder, f"file://{tmp_path / 'url_out'}")


def test_runner_beam_without_beam_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` fails.
    csv, folder, _ = png_dataset(tmp_path, n=4)
    argv = ["make_tfrecords", f"--labels={csv}", f"--images={folder}", f"--output={tmp_path / 'o'}"]
    assert make_tfrecords_cmd.main([*argv, "--runner=beam"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "boneage-tpu[beam]" in err[0], err
    assert not (tmp_path / "o").exists()


def test_hand_crop_is_recorded_in_the_manifest_and_the_records(tmp_path, capsys):
    csv, folder = write_hand_dataset(tmp_path / "hands", n=6)
    options = {"image_size": 48, "encoding": "png", "split_name": "test"}
    manifest = convert(csv, folder, tmp_path / "out", crop="hand", quiet=False, **options)
    assert (manifest["crop"], manifest["crop_margin"]) == ("hand", crop.DEFAULT_MARGIN)
    assert schema.manifest_crop(manifest) == ("hand", crop.DEFAULT_MARGIN)
    assert manifest["options"]["crop"] == "hand"
    # The inverted image has no bright hand: stored whole, counted and listed, not skipped.
    assert manifest["records_written"] == 6 and manifest["skipped"] == []
    assert manifest["crop_fallbacks"] == 1
    [kept] = manifest["crop_fallback_images"]
    assert (kept["row"], kept["id"]) == (7, "h5") and kept["path"].endswith("h5.png")
    assert "no hand found" in kept["reason"]
    printed = capsys.readouterr().out
    assert "crop hand (margin 1.15): no hand found in 1 image(s), stored uncropped: 'h5'" in printed
    records = read_records(tmp_path / "out", "test")
    assert len(records) == 6
    for r in records:
        image_id = r["id"].decode()
        data = (folder / f"{image_id}.png").read_bytes()
        # The records hold exactly what the shared preparation (predict's too) gives.
        expected = images.prepare(data, image_id, 48, "png", crop="hand")
        assert (r["image"], int(r["height"]), int(r["width"])) == expected, image_id
        uncropped = images.prepare(data, image_id, 48, "png")
        assert (expected == uncropped) == (image_id == "h5"), image_id
    # Worker processes give the same shards and the same list.
    pooled = convert(csv, folder, tmp_path / "pooled", crop="hand", num_workers=2, **options)
    assert shard_bytes(tmp_path / "pooled") == shard_bytes(tmp_path / "out")
    assert pooled["crop_fallback_images"] == manifest["crop_fallback_images"]


def test_uncropped_conversion_records_crop_none_and_keeps_its_plan_key(tmp_path):
    csv, folder = write_hand_dataset(tmp_path / "hands", n=4)
    manifest = convert(csv, folder, tmp_path / "out", image_size=48, split_name="test")
    assert (manifest["crop"], manifest["crop_margin"]) == ("none", None)
    assert (manifest["crop_fallbacks"], manifest["crop_fallback_images"]) == (0, [])
    assert schema.manifest_crop(manifest) == ("none", 0.0)
    # Not in the options: the plan key of an uncropped conversion is what it was before --crop.
    assert "crop" not in manifest["options"] and "crop_margin" not in manifest["options"]
    older = {k: v for k, v in manifest.items() if not k.startswith("crop")}
    assert schema.manifest_crop(older) == ("none", 0.0)
    for bad, message in (
        ({"crop": "box"}, "manifest crop must be one of none, hand"),
        ({"crop": "hand"}, "crop_margin must be in 1.0..4.0, got None"),
        ({"crop": "hand", "crop_margin": 0.5}, "crop_margin must be in 1.0..4.0, got 0.5"),
    ):
        with pytest.raises(schema.ManifestError, match=message):
            schema.manifest_crop({**manifest, **bad})


def test_reusing_an_output_with_another_crop_is_refused(tmp_path):
    csv, folder = write_hand_dataset(tmp_path / "hands", n=6)
    options = {"image_size": 48, "encoding": "png", "split_name": "test", "num_shards": 3}
    convert(csv, folder, tmp_path / "plain", **options)
    with pytest.raises(ConvertError, match="finished conversion of other inputs or options"):
        convert(csv, folder, tmp_path / "plain", crop="hand", **options)
    convert(csv, folder, tmp_path / "hand", crop="hand", **options)
    assert convert(csv, folder, tmp_path / "hand", crop="hand", **options)["crop"] == "hand"
    with pytest.raises(ConvertError, match="finished conversion of other inputs or options"):
        convert(csv, folder, tmp_path / "hand", crop="hand", crop_margin=1.3, **options)

    def stop(name):
        raise _Stop

    with pytest.raises(_Stop):
        convert(csv, folder, tmp_path / "cut", on_shard_done=stop, **options)
    with pytest.raises(ConvertError, match="unfinished conversion of other inputs"):
        convert(csv, folder, tmp_path / "cut", crop="hand", **options)
    redone = convert(csv, folder, tmp_path / "cut", crop="hand", overwrite=True, **options)
    assert redone["crop"] == "hand" and redone["crop_fallbacks"] == 1


def test_bad_crop_settings_are_one_line_errors(tmp_path, capsys):
    csv, folder = write_hand_dataset(tmp_path / "hands", n=2)
    with pytest.raises(ConvertError, match="--crop must be one of none, hand, got 'box'"):
        convert(csv, folder, tmp_path / "a", crop="box")
    with pytest.raises(ConvertError, match=r"--crop_margin must be in 1.0..4.0, got 0.5"):
        convert(csv, folder, tmp_path / "b", crop="hand", crop_margin=0.5)
    with pytest.raises(ConvertError, match="--crop_margin 1.3 needs --crop hand"):
        convert(csv, folder, tmp_path / "m", crop_margin=1.3)
    argv = ["make_tfrecords", f"--labels={csv}", f"--images={folder}", f"--output={tmp_path}/c"]
    assert make_tfrecords_cmd.main([*argv, "--crop=box"]) == 2
    assert "value should be one of" in capsys.readouterr().err  # absl's enum check
    assert make_tfrecords_cmd.main([*argv, "--crop=hand", "--crop_margin=0.5"]) == 2
    assert "--crop_margin must be >= 1.0, got 0.5" in capsys.readouterr().err
    assert make_tfrecords_cmd.main(["make_tfrecords", "--help"]) == 0
    assert "--crop_margin" in capsys.readouterr().out


@pytest.mark.shared
def test_real_rsna_sample_hand_crop(rsna_sample_dir, tmp_path):
    csv = rsna_sample_dir / "boneage-training-dataset.csv"
    folder = rsna_sample_dir / "boneage-training-dataset"
    manifest = convert(csv, folder, tmp_path / "out", image_size=256, crop="hand", num_workers=2)
    assert manifest["records_written"] == 12 and manifest["crop_fallbacks"] == 0
    records = read_records(tmp_path / "out", "train") + read_records(tmp_path / "out", "val")
    for r in records:
        image_id = r["id"].decode()
        original = images.read_grayscale(str(folder / f"{image_id}.png"))
        box = crop.hand_box(original)
        height, width = original.shape
        # These films show the hand from fingertips to forearm: the box keeps all of its
        # height and most of its width.
        assert box.fallback == "" and box.bottom - box.top >= 0.9 * height, image_id
        assert box.right - box.left >= 0.6 * width, image_id
        cut = original[box.top : box.bottom, box.left : box.right]
        stored = images.decode(r["image"], "jpeg", r["height"], r["width"])
        expected = images.resize_longest_side(cut, 256)
        assert stored.shape == expected.shape, image_id
        assert np.corrcoef(stored.ravel(), expected.ravel())[0, 1] >= 0.99, image_id
