"""Tests of the tf.data input pipeline: decode/resize, batching modes, sharding, balancing."""

from __future__ import annotations

import collections
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from boneage_tpu.core import schema
from boneage_tpu.data import pipeline as data
from boneage_tpu.data import sampling
from tests.records import write_toy_dataset


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _records(path: str, split: str) -> dict[str, dict]:
    """Reads a toy split's records directly: id -> parsed features (the ground truth)."""
    manifest = schema.read_manifest(path)
    files = schema.shard_paths(path, manifest, split)
    out = {}
    for serialized in tf.data.TFRecordDataset(files):
        features = {k: v.numpy() for k, v in schema.parse_examples(serialized).items()}
        out[features["id"].decode()] = features
    return out


def _ids(batch: dict[str, tf.Tensor]) -> list[str]:
    return [
        i.decode() for i, m in zip(batch["id"].numpy(), batch["mask"].numpy(), strict=True) if m > 0
    ]


@pytest.fixture(scope="module")
def toy(toy_dataset) -> str:
    """The session's toy records with 4 shards per split (13 val records: a ragged last batch)."""
    return toy_dataset(splits={"train": 40, "val": 13}, height=40, width=32, shards_per_split=4)


# ---------------------------------------------------------------- decode + resize


def test_fit_to_square_portrait_is_centred_between_zero_columns():
    image = np.full((40, 20, 1), 200, np.uint8)
    out = data.fit_to_square(tf.constant(image), 20).numpy()
    assert out.shape == (20, 20, 1) and out.dtype == np.uint8
    assert (out[:, :5] == 0).all() and (out[:, 15:] == 0).all() and (out[:, 5:15] == 200).all()


def test_fit_to_square_landscape_is_centred_between_zero_rows():
    image = np.full((10, 30, 1), 90, np.uint8)
    out = data.fit_to_square(tf.constant(image), 15).numpy()[..., 0]
    assert (out[:5] == 0).all() and (out[10:] == 0).all() and (out[5:10] == 90).all()


def test_fit_to_square_keeps_an_image_of_the_target_size_exactly():
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 1)).astype(np.uint8)
    np.testing.assert_array_equal(data.fit_to_square(tf.constant(image), 24).numpy(), image)


def test_fit_to_square_enlarges_small_images_smoothly():
    ramp = np.repeat(np.array([[0, 100]], np.uint8), 10, axis=0)[..., None]  # 10 x 2
    out = data.fit_to_square(tf.constant(ramp), 20).numpy()[..., 0]
    assert (out[:, :8] == 0).all() and (out[:, 12:] == 0).all()  # 20 x 4 content, centred
    np.testing.assert_array_equal(out[0, 8:12], [0, 25, 75, 100])  # bilinear, not blocks


def test_fit_to_square_downscaling_is_antialiased():
    checker = (np.indices((40, 40)).sum(axis=0) % 2 * 255).astype(np.uint8)[..., None]
    out = data.fit_to_square(tf.constant(checker), 20).numpy()
    # Nearest or plain bilinear sampling would return 0s and 255s; averaging gives mid-grey.
    assert np.abs(out.astype(int) - 128).max() <= 1


def test_decode_image_bytes_reads_grey_palette_and_16_bit_png_alike():
    grey = np.random.default_rng(1).integers(0, 256, (12, 10)).astype(np.uint8)
    palette = Image.fromarray(grey, mode="L").convert("P")  # adaptive palette of grey entries
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    expected = data.fit_to_square(tf.constant(grey[..., None]), 12).numpy()
    for encoded in (_png(grey), buf.getvalue(), _png(grey.astype(np.uint16) * 257)):
        out = data.decode_image_bytes(tf.constant(encoded), 12).numpy()
        np.testing.assert_array_equal(out, expected)


def test_serving_jpeg_decode_matches_the_training_pipeline_exactly():
    image = (np.add.outer(np.arange(30), np.arange(20)) * 4 % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="JPEG", quality=90)
    jpeg = tf.constant(buf.getvalue())
    served = data.decode_image_bytes(jpeg, 16).numpy()
    trained = data.decode_stored_image(jpeg, "jpeg", 30, 20, 16).numpy()
    np.testing.assert_array_equal(served, trained)
    assert (
        np.abs(
            served[:, 3:13].astype(int) - data.fit_to_square(image[..., None], 16).numpy()[:, 3:13]
        ).mean()
        < 4
    )


def test_decode_stored_raw_image():
    image = np.arange(35, dtype=np.uint8).reshape(5, 7)
    out = data.decode_stored_image(tf.constant(image.tobytes()), "raw", 5, 7, 7).numpy()[..., 0]
    np.testing.assert_array_equal(out[1:6], image)
    assert (out[0] == 0).all() and (out[6] == 0).all()


# ---------------------------------------------------------------- training / eval modes


def test_training_element_spec_is_static_uint8_and_infinite(toy):
    ds = data.build_dataset(toy, "train", training=True, batch_size=8, image_size=24)
    spec = ds.element_spec
    assert spec["image"].shape == (8, 24, 24, 1) and spec["image"].dtype == tf.uint8
    for name in ("male", "boneage", "mask"):
        assert spec[name].shape == (8,) and spec[name].dtype == tf.float32
    assert spec["id"].shape == (8,) and spec["id"].dtype == tf.string
    assert ds.cardinality() == tf.data.INFINITE_CARDINALITY
    truth = _records(toy, "train")
    seen = collections.Counter()
    for batch in ds.take(10):  # 80 draws from 40 records: two full passes
        assert (batch["mask"].numpy() == 1).all()
        for image_id, age, male in zip(
            _ids(batch), batch["boneage"].numpy(), batch["male"].numpy(), strict=True
        ):
            assert age == truth[image_id]["boneage"] and male == truth[image_id]["male"]
            seen[image_id] += 1
    assert sorted(seen.values()) == [2] * 40  # shuffle before repeat: each pass is complete


def test_eval_yields_every_record_exactly_once_in_a_fixed_order(toy):
    ds = data.build_dataset(toy, "val", training=False, batch_size=4, image_size=24)
    assert ds.element_spec["image"].shape == (4, 24, 24, 1)
    batches = list(ds)
    assert len(batches) == 4  # 13 records -> 3 full batches + 1 padded
    ids = [i for b in batches for i in _ids(b)]
    assert sorted(ids) == sorted(_records(toy, "val")) and len(ids) == 13
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"].numpy(), [1, 0, 0, 0])
    np.testing.assert_array_equal(last["boneage"].numpy()[1:], [schema.NO_LABEL] * 3)
    assert (last["image"].numpy()[1:] == 0).all() and list(last["id"].numpy()[1:]) == [b""] * 3
    again = [
        i
        for b in data.build_dataset(toy, "val", training=False, batch_size=4, image_size=24)
        for i in _ids(b)
    ]
    assert again == ids


def test_eval_images_are_the_decoded_records(toy):
    truth = _records(toy, "val")
    for batch in data.build_dataset(toy, "val", training=False, batch_size=5, image_size=20):
        for image, image_id in zip(batch["image"].numpy(), _ids(batch), strict=False):
            expected = data.decode_image_bytes(truth[image_id]["image"], 20).numpy()
            np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("training", [False, True])
def test_two_input_pipelines_read_disjoint_shards_covering_the_split(toy, training):
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(2, pipeline, 2)
        ds = data.build_dataset(
            toy, "train", training=training, batch_size=4, image_size=16, input_context=context
        )
        seen.append({i for b in ds.take(30) for i in _ids(b)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(_records(toy, "train"))


def test_more_input_pipelines_than_shards_is_a_clear_error(toy):
    context = tf.distribute.InputContext(8, 0, 8)
    with pytest.raises(ValueError, match="fewer than the 8 input pipelines"):
        data.build_dataset(
            toy, "val", training=False, batch_size=2, image_size=16, input_context=context
        )


def test_cached_and_streamed_eval_are_identical(toy):
    def run(cache: str) -> list[dict]:
        ds = data.build_dataset(
            toy, "val", training=False, batch_size=4, image_size=16, cache=cache
        )
        return [{k: v.numpy() for k, v in b.items()} for b in ds]

    for cached, streamed in zip(run("yes"), run("no"), strict=True):
        for name in streamed:
            np.testing.assert_array_equal(cached[name], streamed[name])


@pytest.mark.parametrize("training", [False, True])
def test_raw_and_png_records_give_the_same_batches(tmp_path, training):
    # Raw records are reshaped from their stored height/width inside the batched decode.
    def batches(encoding: str) -> list[dict]:
        path = str(tmp_path / encoding)
        write_toy_dataset(path, splits={"train": 10}, height=30, width=20, encoding=encoding)
        ds = data.build_dataset(
            path, "train", training=training, batch_size=4, image_size=16, cache="no"
        )
        return [{k: v.numpy() for k, v in b.items()} for b in ds.take(3)]

    png, raw = batches("png"), batches("raw")
    if training:  # Same seed, but the order of a parallel interleave is not fixed: by id.
        png, raw = (
            {i: img for b in run for i, img in zip(b["id"], b["image"], strict=True)}
            for run in (png, raw)
        )
        shared = set(png) & set(raw)
        assert shared
        for image_id in shared:
            np.testing.assert_array_equal(png[image_id], raw[image_id])
        return
    for a, b in zip(png, raw, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_auto_cache_follows_the_ram_budget():
    split = {"count": 1000}
    assert data.use_cache("auto", split, 32, budget_bytes=1000 * 32 * 32)
    assert not data.use_cache("auto", split, 32, budget_bytes=1000 * 32 * 32 - 1)
    assert data.use_cache("auto", split, 32, num_pipelines=2, budget_bytes=500 * 32 * 32)
    assert data.use_cache("yes", split, 4096, budget_bytes=0)
    assert not data.use_cache("no", split, 1, budget_bytes=10**12)


# ---------------------------------------------------------------- balanced sampling


def _write_unbalanced(path: str, counts: list[int]) -> None:
    """Writes one split whose stratum s holds counts[s] records (tiny 8x8 images)."""
    records, strata = [], [0] * schema.NUM_STRATA
    edges = schema.AGE_BAND_EDGES_MONTHS
    for stratum, count in enumerate(counts):
        band, male = divmod(stratum, 2)
        age = (edges[band] + edges[band + 1]) / 2
        for i in range(count):
            records.append(
                schema.encode_example(
                    image_id=f"s{stratum}-{i}", image=_png(np.full((8, 8), stratum * 20, np.uint8)),
                    height=8, width=8, encoding="png", boneage=age, male=bool(male),
                )
            )  # fmt: skip
            strata[schema.stratum(age, bool(male))] += 1
    order = np.random.default_rng(0).permutation(len(records))
    shards = []
    for index in range(3):
        name = schema.shard_name("train", index, 3)
        chosen = order[index::3]
        with tf.io.TFRecordWriter(f"{path}/{name}") as writer:
            for i in chosen:
                writer.write(records[i])
        shards.append({"name": name, "records": len(chosen)})
    split = {"count": len(records), "labeled": len(records), "shards": shards}
    split["counts_by_stratum"] = strata
    manifest = {"schema_version": schema.SCHEMA_VERSION, "encoding": "png", "image_size": 8}
    manifest["splits"] = {"train": split}
    with open(f"{path}/{schema.MANIFEST_NAME}", "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("cache", ["no", "yes"])
def test_age_sex_balance_draws_strata_uniformly(tmp_path, cache):
    counts = [2, 5, 40, 90, 1, 12, 0, 3, 150, 7, 25, 60]  # 11 non-empty strata, 1 to 150
    _write_unbalanced(str(tmp_path), counts)
    ds = data.build_dataset(
        str(tmp_path), "train", training=True, batch_size=500, image_size=8,
        balance="age_sex", cache=cache, seed=3,
    )  # fmt: skip
    drawn = collections.Counter()
    for batch in ds.take(40):  # 20,000 draws
        for age, male in zip(batch["boneage"].numpy(), batch["male"].numpy(), strict=True):
            drawn[schema.stratum(age, male)] += 1
    expected = 20000 / 11
    assert set(drawn) == {s for s, c in enumerate(counts) if c}
    for stratum, n in drawn.items():
        assert abs(n / expected - 1) <= 0.15, (stratum, n, expected)


def test_stratum_repeats_equalise_expected_counts():
    counts = [10, 0, 40, 50]
    repeats = sampling.stratum_repeats(counts)
    assert repeats[1] == 0.0
    np.testing.assert_allclose(
        [c * r for c, r in zip(counts, repeats, strict=True) if c], [100 / 3] * 3
    )
    with pytest.raises(ValueError, match="labeled"):
        sampling.stratum_repeats([0, 0])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"balance": "sex"}, "balance must be one of"),
        ({"cache": "maybe"}, "cache must be one of"),
        ({"balance": "age_sex", "training": False}, "training only"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_are_one_line_errors(toy, kwargs, match):
    args = {"training": True, "batch_size": 4, "image_size": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        data.build_dataset(toy, "train", **args)


def test_missing_manifest_and_unknown_split_are_manifest_errors(toy, tmp_path):
    with pytest.raises(schema.ManifestError, match="no manifest.json"):
        data.build_dataset(str(tmp_path), "train", training=True, batch_size=4, image_size=16)
    with pytest.raises(schema.ManifestError, match="not in the data"):
        data.build_dataset(toy, "test", training=False, batch_size=4, image_size=16)


def test_balance_needs_labels(tmp_path):
    write_toy_dataset(tmp_path, splits={"train": 6}, labeled=False)
    with pytest.raises(ValueError, match="labeled"):
        data.build_dataset(
            str(tmp_path), "train", training=True, batch_size=2, image_size=8, balance="age_sex"
        )


@pytest.mark.gcs
def test_reads_a_dataset_on_gcs(gcs_dir):
    write_toy_dataset(gcs_dir, splits={"val": 7}, height=16, width=12, shards_per_split=2)
    ds = data.build_dataset(gcs_dir, "val", training=False, batch_size=3, image_size=16)
    assert sorted(i for b in ds for i in _ids(b)) == [f"val{i:04d}" for i in range(7)]
