"""Converts RSNA bone-age images + labels CSV into sharded TFRecords, a manifest and TFDS metadata.

    boneage-make-tfrecords --labels CSV --images DIR --output PATH [--image_size 512]
        [--crop hand [--crop_margin 1.15]]

PATH is a local folder or gs://bucket/prefix. The result: `<split>-NNNNN-of-NNNNN.tfrecord`
shards (records as in `boneage_tpu.core.schema`), TFDS `dataset_info.json`/`features.json`, and
`manifest.json`, written last. An interrupted run resumes where it stopped when rerun with the
same arguments, and gives the same bytes as an uninterrupted one; `--overwrite` starts again.
`--crop hand` cuts each decoded image to its hand's box (`boneage_tpu.data.crop`) before the
resize; the manifest records the crop and every image where no hand was found and the whole
image was kept.

One module of some 500 lines because resuming, racing workers and the disk-full path all
guard the one write of the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow as tf
import tqdm

from boneage_tpu.cli import option
from boneage_tpu.convert import manifest as convert_output
from boneage_tpu.convert import plan as plan_lib
from boneage_tpu.convert import shards as convert_write
from boneage_tpu.convert import workers as convert_workers
from boneage_tpu.core import beam_runtime, guard, schema
from boneage_tpu.core.errors import UsageError
from boneage_tpu.data import crop as crop_lib
from boneage_tpu.data import images, layouts
from boneage_tpu.data import verify as convert_verify
from boneage_tpu.data.layouts import ConvertError

MIN_SHARDS = 16  # Lets 8+ readers (hosts or interleave cycles) read in parallel on small sets.
_SAMPLE_IMAGES = 16  # Images encoded to estimate the record size when it decides the shard count.
_RECORD_OVERHEAD = 256  # Bytes of features and framing besides the image.
KILL_ENV = "BONEAGE_TPU_KILL_AFTER_SHARDS"  # Test hook of the CLI: SIGKILL after N shards.


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))  # The cores this process may use, not the machine's.
    return os.cpu_count() or 1


def _check_options(
    image_size: int,
    encoding: str,
    jpeg_quality: int,
    target_shard_mb: float,
    num_shards: int,
    num_workers: int,
) -> None:
    if image_size < 1:
        raise ConvertError(f"--image_size must be >= 1, got {image_size}")
    if encoding not in schema.ENCODINGS:
        raise ConvertError(f"--encoding must be one of {schema.ENCODINGS}, got {encoding!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ConvertError(f"--jpeg_quality must be in 1..100, got {jpeg_quality}")
    if target_shard_mb <= 0 or num_shards < 0 or num_workers < 0:
        raise ConvertError("--target_shard_mb must be > 0; --num_shards, --num_workers >= 0")


def _check_crop(crop: str, crop_margin: float) -> None:
    if crop not in schema.CROPS:
        raise ConvertError(f"--crop must be one of {', '.join(schema.CROPS)}, got {crop!r}")
    low, high = schema.CROP_MARGIN_RANGE
    if crop != "none" and not low <= crop_margin <= high:
        raise ConvertError(f"--crop_margin must be in {low}..{high}, got {crop_margin}")
    if crop == "none" and crop_margin != crop_lib.DEFAULT_MARGIN:
        # A margin given alone would be silently ignored.
        raise ConvertError(f"--crop_margin {crop_margin:g} needs --crop hand")


def _shard_counts(splits: dict[str, list[layouts.Row]], options: dict[str, Any]) -> dict:
    """Shards per split: --num_shards, or enough for ~target_shard_mb each, at least MIN_SHARDS."""
    if options["num_shards"]:
        return {s: min(options["num_shards"], len(rows)) for s, rows in splits.items()}
    target = options["target_shard_mb"] * 1e6
    # An upper bound of the record size first: most conversions need no sampling at all.
    record_bytes = 2 * options["image_size"] ** 2 + _RECORD_OVERHEAD
    if all(len(rows) * record_bytes <= MIN_SHARDS * target for rows in splits.values()):
        return {s: min(MIN_SHARDS, len(rows)) for s, rows in splits.items()}
    everything = [r for rows in splits.values() for r in rows]
    step = max(1, len(everything) // _SAMPLE_IMAGES)
    sizes = []
    with convert_workers.Preparer(0, *_prepare_args(options)) as preparer:
        for _, result in preparer.map(everything[::step][:_SAMPLE_IMAGES]):
            if not isinstance(result, images.ImageError):
                sizes.append(len(result[0]) + _RECORD_OVERHEAD)
    record_bytes = sum(sizes) / len(sizes) if sizes else record_bytes
    return {
        s: min(len(rows), max(MIN_SHARDS, math.ceil(len(rows) * record_bytes / target)))
        for s, rows in splits.items()
    }


def _prepare_args(options: dict[str, Any]) -> tuple[int, str, int, str, float]:
    """The `Preparer` arguments of a conversion's options: size, encoding, quality, crop."""
    return (
        options["image_size"],
        options["encoding"],
        options["jpeg_quality"],
        options.get("crop", "none"),
        options.get("crop_margin", crop_lib.DEFAULT_MARGIN),
    )


@contextlib.contextmanager
def _disk_full_is_one_line(output: str) -> Iterator[None]:
    """Turns a full disk (or quota) while writing `output` into one ConvertError line.

    What was written stays resumable: shards become final only when complete, the manifest
    is created last and atomically, so a rerun after freeing space continues.
    """
    hint = "free some space (or use another --output) and rerun the same command to resume"
    try:
        yield
    except tf.errors.ResourceExhaustedError as e:
        raise ConvertError(
            f"out of space writing {output} ({' '.join(e.message.split())[:160]}): {hint}"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ConvertError(f"no space left on the device writing {output}: {hint}") from None


def _reports_full_disk(convert_fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Runs `convert_fn(labels_csv, images_dir, output, ...)` under `_disk_full_is_one_line`."""

    @functools.wraps(convert_fn)
    def wrapper(labels_csv: str, images_dir: str, output: str, **kwargs: Any) -> dict[str, Any]:
        with _disk_full_is_one_line(output):
            return convert_fn(labels_csv, images_dir, output, **kwargs)

    return wrapper


@_reports_full_disk
def convert(
    labels_csv: str,
    images_dir: str,
    output: str,
    *,
    image_size: int = 512,
    encoding: str = "jpeg",
    jpeg_quality: int = 95,
    crop: str = "none",
    crop_margin: float = crop_lib.DEFAULT_MARGIN,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    split_name: str = "",
    num_folds: int = 0,
    target_shard_mb: float = 150.0,
    num_shards: int = 0,
    num_workers: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    quiet: bool = False,
    on_shard_done: Callable[[str], None] | None = None,
    runner: str = "local",
    beam_options: str = "",
) -> dict[str, Any]:
    """Converts a labels CSV and its images into TFRecord shards; returns the manifest.

    Args:
      labels_csv: Kaggle, RSNA validation or RSNA test CSV (local or gs://).
      images_dir: folder searched recursively for `<id>.png|.jpg|.jpeg|.dcm`.
      output: output folder (local or gs://).
      image_size: longest side of the stored images.
      encoding: jpeg | png | raw.
      jpeg_quality: JPEG quality (1..100).
      crop: none | hand: cut each decoded image to its hand's box before the resize
        (`boneage_tpu.data.crop`); an image without a plausible hand is kept whole and listed
        in the manifest's `crop_fallback_images`.
      crop_margin: the hand box's enlargement about its centre (1.0..4.0; hand crop only).
      val_fraction: fraction of each age band x sex stratum put in the `val` split.
      split_seed: seed of the split and of the record order.
      split_name: write every row to this one split instead (default `test` for the RSNA
        test layout).
      num_folds: K >= 2 writes K stratified folds `fold0..fold{K-1}` instead of train/val
        (for `train --fold i`); 0: train/val.
      target_shard_mb: shard size target when `num_shards` is 0.
      num_shards: shards per split (capped at its record count); 0 picks from the size target.
      num_workers: worker processes (default: CPU count; 0: all in this process).
      overwrite: delete a previous conversion in `output` and start again.
      strict: make any skipped input fatal.
      quiet: no progress bar and no summary.
      on_shard_done: called with each shard name once it is complete (a test hook; local
        runner only).
      runner: local (this machine's process pool) or beam (`boneage_tpu.convert.beam`: the
        same rows, records and shards, written by an Apache Beam pipeline).
      beam_options: Beam pipeline options for `runner="beam"` (default: Beam's local runner
        with `num_workers` processes).

    Raises:
      ConvertError: a one-line reason, for bad arguments, unusable CSV, no images, unwritable
        output, a different conversion already in `output`, or any skip under `strict`.
    """
    if runner not in beam_runtime.RUNNERS:
        raise ConvertError(f"--runner must be one of {beam_runtime.RUNNERS}, got {runner!r}")
    if runner == "beam":
        beam_runtime.import_beam()  # Before any work: a missing extra is one line, at once.
    num_workers = _cpu_count() if num_workers is None else num_workers
    _check_options(image_size, encoding, jpeg_quality, target_shard_mb, num_shards, num_workers)
    _check_crop(crop, crop_margin)
    output = output.rstrip("/")
    # The output folder may hold the inputs (data/ with data/images/), not be one of them.
    guard.check_outputs(
        {"--output": (output, "folder")},
        {"--labels": [labels_csv], "--images": [images_dir]},
        may_hold_inputs=True,
    )
    csv_bytes = layouts.read_csv_bytes(labels_csv)
    layout, rows, skipped_rows, rows_in, named = layouts.parse_labels(csv_bytes)
    rows, missing, orphans = layouts.match_images(rows, layouts.find_images(images_dir), named)
    skipped_rows = sorted([*skipped_rows, *missing], key=lambda s: s["row"])
    if strict and (skipped_rows or orphans):
        first = [*skipped_rows, *orphans][0]
        raise ConvertError(
            f"--strict: {len(skipped_rows) + len(orphans)} input(s) would be skipped, first: "
            f"line {first['row']}, id {first['id']!r}: {first['reason']}"
        )
    if not rows:
        raise ConvertError(
            f"nothing to convert: all {rows_in} CSV rows are skipped "
            f"(first: line {skipped_rows[0]['row']}: {skipped_rows[0]['reason']})"
        )
    split_name = split_name or ("test" if layout.name == "rsna_test" else "")
    splits = plan_lib.assign_splits(
        rows,
        val_fraction=val_fraction,
        seed=split_seed,
        split_name=split_name,
        num_folds=num_folds,
    )
    options = {
        "image_size": image_size,
        "encoding": encoding,
        "jpeg_quality": jpeg_quality,
        # Only when cropping: an uncropped conversion keeps the plan key it had before --crop
        # existed (a finished one is still recognised), a cropped one gets its own.
        **({"crop": crop, "crop_margin": float(crop_margin)} if crop != "none" else {}),
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "split_name": split_name,
        **({"num_folds": num_folds} if num_folds else {}),
        "target_shard_mb": target_shard_mb,
        "num_shards": num_shards,
    }
    csv_sha256 = hashlib.sha256(csv_bytes).hexdigest()
    key = plan_lib.plan_key(options, csv_sha256, splits, [*skipped_rows, *orphans])
    state = convert_write.OutputState(output)
    if overwrite:
        state.clear()
    finished = _finished_manifest(output, key)
    if finished is not None:
        state.cleanup()
        if not quiet:
            print(f"{output} already holds this conversion; nothing to do (--overwrite redoes it)")
        return finished
    state.prepare()
    plan = state.load_plan()
    if plan is not None and plan["plan_key"] != key:
        raise ConvertError(
            f"{output} holds an unfinished conversion of other inputs or options: "
            "rerun with those, or pass --overwrite"
        )
    if plan is None:
        if state.shard_files():
            raise ConvertError(
                f"{output} already has shard files ({state.shard_files()[0]}, ...) "
                "from another conversion: pass --overwrite or use an empty folder"
            )
        plan = {"plan_key": key, "num_shards": _shard_counts(splits, options)}
        state.save_plan(plan)
    jobs = convert_write.make_jobs(splits, plan["num_shards"])
    if runner == "beam":
        from boneage_tpu.convert import beam as convert_beam  # Lazily: Beam is an extra.

        infos = convert_beam.write_shards(
            state,
            jobs,
            options,
            beam_options=beam_options,
            num_workers=num_workers or None,
            strict=strict,
            quiet=quiet,
        )
    else:
        infos = _write_shards(state, jobs, options, num_workers, strict, quiet, on_shard_done)
    manifest = convert_output.build_manifest(
        labels_csv=labels_csv,
        images_dir=images_dir,
        csv_sha256=csv_sha256,
        layout=layout.name,
        options=options,
        plan_key=key,
        jobs=jobs,
        infos=infos,
        rows_in=rows_in,
        skipped_rows=skipped_rows,
        orphans=orphans,
    )
    if manifest["records_written"] == 0:
        raise ConvertError(
            f"no records written: every one of the {rows_in} rows was skipped "
            f"(first: {manifest['skipped'][0]['reason']})"
        )
    if strict and manifest["skipped"]:
        raise AssertionError("strict conversion skipped an input")
    convert_output.write_tfds_metadata(output, manifest)
    if not convert_output.write_manifest(output, manifest):
        manifest = _raced_manifest(output, key)
    state.cleanup()
    if not quiet:
        print(convert_output.summary(manifest))
        print(f"wrote {len(jobs)} shard(s) and {schema.MANIFEST_NAME} to {output}")
    return manifest


def _finished_manifest(output: str, key: str) -> dict[str, Any] | None:
    """Returns the manifest of a finished identical conversion, None when there is none."""
    if not tf.io.gfile.exists(convert_write.join(output, schema.MANIFEST_NAME)):
        return None
    try:
        manifest = schema.read_manifest(output)
    except schema.ManifestError as e:
        raise ConvertError(f"{e}; pass --overwrite to redo the conversion") from None
    if manifest.get("plan_sha256") != key:
        raise ConvertError(
            f"{output} already holds a finished conversion of other inputs or "
            "options: pass --overwrite or use another folder"
        )
    return manifest


def _raced_manifest(output: str, key: str) -> dict[str, Any]:
    """Returns the manifest another converter created first, if it is of this conversion."""
    try:
        manifest = schema.read_manifest(output)
    except schema.ManifestError as e:
        raise ConvertError(f"{e}; pass --overwrite to replace it") from None
    if manifest.get("plan_sha256") != key:
        raise ConvertError(
            f"another conversion of other inputs or options wrote {output}/"
            f"{schema.MANIFEST_NAME} first, so its shards may be mixed with these: "
            "rerun with --overwrite, one converter per output folder"
        )
    return manifest


def _write_shards(
    state: convert_write.OutputState,
    jobs: Sequence[convert_write.ShardJob],
    options: dict[str, Any],
    num_workers: int,
    strict: bool,
    quiet: bool,
    on_shard_done: Callable[[str], None] | None,
) -> dict[str, dict[str, Any]]:
    """Writes the shards that are not complete yet; returns every shard's info."""
    infos = {job.name: state.completed(job) for job in jobs}
    todo = [job for job in jobs if infos[job.name] is None]
    total = sum(len(job.rows) for job in todo)
    bar = tqdm.tqdm(total=total, unit="img", desc="convert", disable=quiet or not total)
    preparer = convert_workers.Preparer(num_workers, *_prepare_args(options))
    with bar, preparer:
        prepared = preparer.map(row for job in todo for row in job.rows)
        for job in todo:
            infos[job.name] = state.write_shard(
                job, prepared, options["encoding"], strict, on_record=lambda: bar.update(1)
            )
            if on_shard_done is not None:
                on_shard_done(job.name)
    return infos


def _kill_after(shards: int) -> Callable[[str], None]:
    done = []

    def hook(name: str) -> None:
        done.append(name)
        if len(done) >= shards:
            os.kill(os.getpid(), signal.SIGKILL)  # SIGKILL: no cleanup at all, as a real crash.

    return hook


@dataclasses.dataclass
class ConvertConfig:
    """The converter's command line: the arguments of `convert`, as flags."""

    labels: str = option("", "Labels CSV (Kaggle, RSNA validation or RSNA test layout).")
    images: str = option("", "Folder with <id>.png|.jpg|.dcm images (searched recursively).")
    output: str = option("", "Output folder, local or gs://bucket/prefix.")
    image_size: int = option(
        512, "Longest side of the stored images (aspect kept).", min=1, max=65536
    )
    encoding: str = option("jpeg", "Stored image encoding.", choices=schema.ENCODINGS)
    jpeg_quality: int = option(95, "JPEG quality.", min=1, max=100)
    crop: str = option(
        "none",
        "none | hand: cut each image to the bounding box of its hand (a mask's largest "
        "component) before resizing, as published bone-age models do; images without a "
        "plausible hand are kept whole and counted in the manifest. Predict replays it.",
        choices=schema.CROPS,
    )
    crop_margin: float = option(
        crop_lib.DEFAULT_MARGIN,
        "With --crop hand: the hand box's sides are multiplied by this about its centre.",
        min=schema.CROP_MARGIN_RANGE[0],
        max=schema.CROP_MARGIN_RANGE[1],
    )
    val_fraction: float = option(
        0.1, "Fraction of each age band x sex stratum put in 'val'.", min=0, max=0.99
    )
    split_seed: int = option(
        0, "Seed of the train/val split and of the record order.", min=0, max=2**63 - 1
    )
    split_name: str = option(
        "", "Write every row to this one split (e.g. test) instead of train/val."
    )
    num_folds: int = option(
        0,
        "K >= 2: write K stratified folds fold0..fold{K-1} instead of train/val (train with "
        "--fold i); 0: train/val.",
        min=0,
        max=1000,
    )
    target_shard_mb: float = option(
        150.0, "Target shard size in MB when --num_shards is 0.", min=1e-3, max=1e6
    )
    num_shards: int = option(
        0, "Shards per split (0: from --target_shard_mb, at least 16).", min=0, max=10**6
    )
    num_workers: int | None = option(
        None, "Worker processes (default: CPU count; 0: none).", min=0, max=4096
    )
    overwrite: bool = option(False, "Delete a previous conversion in --output and redo it.")
    strict: bool = option(False, "Fail on the first input that would be skipped.")
    quiet: bool = option(False, "No progress bar and no summary.")
    verify: bool = option(
        False, "Only check the shards in --output against the sizes and sha256 in its manifest."
    )
    runner: str = option(
        "local",
        "local: this machine's process pool; beam: an Apache Beam pipeline (the [beam] extra), "
        "same output.",
        choices=beam_runtime.RUNNERS,
    )
    beam_options: str = option(
        "",
        "With --runner beam: Beam pipeline options, e.g. '--runner=DataflowRunner "
        "--project=P --region=R --temp_location=gs://B/tmp' (default: Beam's local runner, "
        "--num_workers processes).",
    )


def run(
    config: ConvertConfig, on_shard_done: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Runs `convert` with the settings of `config` (or `--verify`); returns the manifest."""
    options = dataclasses.asdict(config)
    verify_only = options.pop("verify")
    # Declared here rather than as `required`: --verify needs only --output.
    required = ("output",) if verify_only else ("labels", "images", "output")
    missing = [f"--{name}" for name in required if not options[name]]
    if missing:
        raise UsageError(f"missing required flag(s): {', '.join(missing)}")
    if verify_only:
        bad = convert_verify.verify(config.output.rstrip("/"))
        if bad:
            raise ConvertError(
                f"{bad} shard(s) in {config.output} do not match {schema.MANIFEST_NAME}: "
                "reconvert with --overwrite"
            )
        return schema.read_manifest(config.output)
    return convert(
        options.pop("labels"),
        options.pop("images"),
        options.pop("output"),
        **options,
        on_shard_done=on_shard_done,
    )


def kill_hook_from_env() -> Callable[[str], None] | None:
    """The CLI's test hook: SIGKILL after `$BONEAGE_TPU_KILL_AFTER_SHARDS` shards, when set."""
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    return _kill_after(kill_after) if kill_after > 0 else None
