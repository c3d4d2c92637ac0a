"""The manifest, the TFDS folder-dataset metadata and the printed summary of a conversion."""

from __future__ import annotations

import collections
import datetime
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

import boneage_tpu
from boneage_tpu.convert.shards import ShardJob, join
from boneage_tpu.core import schema, storage
from boneage_tpu.data.layouts import ConvertError, Row

TFDS_FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
_SUMMARY_SKIPS = 50  # Longer skip lists are in the manifest only.


def _skip_order(entry: dict[str, Any]) -> tuple[int, str]:
    row = entry["row"]
    return (row if row is not None else 1 << 62, entry["path"] or entry["id"])


def _split_entry(jobs: Sequence[ShardJob], infos: dict[str, dict[str, Any]]) -> tuple[dict, list]:
    """Returns a split's manifest entry and the rows written to it."""
    written: list[Row] = []
    shards = []
    for job in jobs:
        info = infos[job.name]
        failed = {entry["row"] for entry in info["skipped"]}
        written.extend(r for r in job.rows if r.line not in failed)
        shards.append({k: info[k] for k in ("name", "records", "bytes", "sha256")})
    labeled = [r for r in written if r.boneage is not None]
    by_band = collections.Counter(schema.age_band(r.boneage) for r in labeled)
    by_stratum = collections.Counter(r.stratum for r in labeled)
    entry = {
        "count": len(written),
        "labeled": len(labeled),
        "shards": shards,
        "counts_by_sex": {
            "male": sum(r.male for r in written),
            "female": sum(not r.male for r in written),
        },
        "counts_by_age_band": {name: by_band[i] for i, name in enumerate(schema.AGE_BAND_NAMES)},
        "counts_by_stratum": [by_stratum[i] for i in range(schema.NUM_STRATA)],
        # Per split, so a K-fold run z-scores with its own training folds' stats.
        "label_stats": {
            "count": len(labeled),
            "mean_months": float(np.mean([r.boneage for r in labeled])) if labeled else None,
            "std_months": float(np.std([r.boneage for r in labeled])) if labeled else None,
        },
    }
    return entry, written


def _label_stats(written: dict[str, list[Row]]) -> dict[str, Any]:
    """Label mean/std from the train split, or from every labeled record when there is none."""
    sources = ["train"] if "train" in written else sorted(written)
    ages = [r.boneage for s in sources for r in written[s] if r.boneage is not None]
    if not ages:
        return {"mean_months": None, "std_months": None, "split": None}
    return {
        "mean_months": float(np.mean(ages)),
        "std_months": float(np.std(ages)),
        "split": "+".join(sources),
    }


def build_manifest(
    *,
    labels_csv: str,
    images_dir: str,
    csv_sha256: str,
    layout: str,
    options: dict[str, Any],
    plan_key: str,
    jobs: Sequence[ShardJob],
    infos: dict[str, dict[str, Any]],
    rows_in: int,
    skipped_rows: Sequence[dict[str, Any]],
    orphans: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Assembles manifest.json from the plan and the per-shard results."""
    by_split: dict[str, list[ShardJob]] = collections.defaultdict(list)
    for job in jobs:
        by_split[job.split].append(job)
    splits, written = {}, {}
    for split, split_jobs in by_split.items():
        splits[split], written[split] = _split_entry(split_jobs, infos)
    failed = [entry for job in jobs for entry in infos[job.name]["skipped"]]
    # Shard infos of a run from before the crop existed have no list: nothing was cropped.
    uncropped = [e for job in jobs for e in infos[job.name].get("crop_fallbacks", [])]
    rows_skipped = sorted([*skipped_rows, *failed], key=_skip_order)
    records = sum(s["count"] for s in splits.values())
    if records + len(rows_skipped) != rows_in:
        raise AssertionError(f"{rows_in} rows in, {records} written, {len(rows_skipped)} skipped")
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "tool_version": boneage_tpu.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source_csv": labels_csv,
        "source_csv_sha256": csv_sha256,
        "images_dir": images_dir,
        "layout": layout,
        "image_size": options["image_size"],
        "encoding": options["encoding"],
        "jpeg_quality": options["jpeg_quality"],
        **schema.crop_entries(
            options.get("crop", "none"),
            options.get("crop_margin", 0.0),
            sorted(uncropped, key=_skip_order),
        ),
        "options": options,
        "plan_sha256": plan_key,
        "splits": splits,
        "label_stats": _label_stats(written),
        "rows_in": rows_in,
        "records_written": records,
        "rows_skipped": len(rows_skipped),
        "images_without_row": len(orphans),
        "skipped": [*rows_skipped, *orphans],
    }


def write_manifest(output: str, manifest: dict[str, Any]) -> bool:
    """Creates manifest.json last: its presence marks a finished conversion.

    Create-only and atomic (`storage.write_if_absent`; a generation precondition on gs://), so
    of two converters racing for one output exactly one manifest lands. Returns False when
    another converter's manifest was there first; it is left untouched.
    """
    text = json.dumps(manifest, indent=2) + "\n"
    try:
        return storage.write_if_absent(join(output, schema.MANIFEST_NAME), text)
    except storage.StorageError as e:
        raise ConvertError(str(e)) from None


def write_tfds_metadata(output: str, manifest: dict[str, Any]) -> None:
    """Makes the output a TFDS folder dataset (`tfds.builder_from_directory(output)`)."""
    try:
        _write_tfds_metadata(output, manifest)
    except (KeyError, ValueError, OSError, tf.errors.OpError) as e:
        raise ConvertError(f"cannot write the TFDS metadata to {output}: {e!r}") from e


def _write_tfds_metadata(output: str, manifest: dict[str, Any]) -> None:
    import tensorflow_datasets as tfds  # Imported lazily: slow, and only needed here.

    split_infos = [
        tfds.core.SplitInfo(
            name=name,
            shard_lengths=[s["records"] for s in split["shards"]],
            num_bytes=sum(s["bytes"] for s in split["shards"]),
            # Without it TFDS records its default file-name template in dataset_info.json.
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=output,
                template=TFDS_FILENAME_TEMPLATE,
                split=name,
                filetype_suffix="tfrecord",
            ),
        )
        for name, split in manifest["splits"].items()
    ]
    tfds.folder_dataset.write_metadata(
        data_dir=output,
        features=schema.tfds_features(),
        split_infos=split_infos,
        filename_template=TFDS_FILENAME_TEMPLATE,
        check_data=False,
        description="RSNA pediatric bone age records written by boneage-make-tfrecords",
    )


def _crop_line(manifest: dict[str, Any]) -> str:
    """The summary's line on the hand crop: the margin and the images it kept whole."""
    kept = manifest["crop_fallback_images"]
    line = (
        f"crop {manifest['crop']} (margin {manifest['crop_margin']:g}): no hand found in "
        f"{len(kept)} image(s), stored uncropped"
    )
    if kept:
        shown = ", ".join(repr(entry["id"]) for entry in kept[:5])
        more = f", ... (all in {schema.MANIFEST_NAME})" if len(kept) > 5 else ""
        line += f": {shown}{more}"
    return line


def summary(manifest: dict[str, Any]) -> str:
    """Returns the final summary table: splits, then every skipped input with its reason."""
    lines = [
        f"{'split':<10}{'records':>9}{'labeled':>9}{'shards':>8}{'MB':>9}{'male':>7}{'female':>8}"
    ]
    for name, split in manifest["splits"].items():
        megabytes = sum(s["bytes"] for s in split["shards"]) / 1e6
        lines.append(
            f"{name:<10}{split['count']:>9}{split['labeled']:>9}{len(split['shards']):>8}"
            f"{megabytes:>9.1f}{split['counts_by_sex']['male']:>7}"
            f"{split['counts_by_sex']['female']:>8}"
        )
    lines.append(
        f"rows in {manifest['rows_in']} = records written {manifest['records_written']} + "
        f"rows skipped {manifest['rows_skipped']}; images without a CSV row: "
        f"{manifest['images_without_row']}"
    )
    if manifest.get("crop", "none") != "none":
        lines.append(_crop_line(manifest))
    skipped = manifest["skipped"]
    if skipped:
        reasons = collections.Counter(" ".join(s["reason"].split()) for s in skipped)
        lines.append(f"skipped {len(skipped)} input(s):")
        for entry in skipped[:_SUMMARY_SKIPS]:
            where = f"line {entry['row']}" if entry["row"] is not None else "no row"
            reason = " ".join(entry["reason"].split())  # A newline would break the table.
            lines.append(f"  {where:<10} id {entry['id']!r:<14} {reason}")
        if len(skipped) > _SUMMARY_SKIPS:
            lines.append(f"  ... {len(skipped) - _SUMMARY_SKIPS} more in {schema.MANIFEST_NAME}")
            common = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(10))
            lines.append(f"  most common reasons: {common}")
    return "\n".join(lines)
