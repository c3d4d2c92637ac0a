"""Inputs and outputs of the predict command: which images (files or a labels CSV), M/F, tables.

A labels CSV is read with the converter's own parser (`boneage_tpu.data.layouts`), so every layout
the converter accepts (Kaggle, RSNA validation, RSNA test) works here too, with the same
itemised skip reasons.
"""

from __future__ import annotations

import csv
import io
import posixpath
import sys
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from boneage_tpu.core.errors import Error, UsageError
from boneage_tpu.data import layouts

_SEX = {"m": 1.0, "male": 1.0, "1": 1.0, "f": 0.0, "female": 0.0, "0": 0.0}


class PredictError(Error, ValueError):
    """Bad prediction input; the message is one line."""


def parse_sex(value: str) -> float:
    """Maps M/F (also male/female, 1/0; any case) to the model's `male` input."""
    key = str(value).strip().lower()
    if key not in _SEX:
        raise UsageError(f"--sex must be M or F, got {value!r}")
    return _SEX[key]


def labeled_items(labels: str, images_dir: str) -> list[dict[str, Any]]:
    """Reads a labels CSV and its image folder like the converter; prints an itemised skip report.

    Returns:
      One {"id", "path", "male", "boneage"} dict per usable row (boneage None when unlabeled).
    """
    try:
        _, rows, skipped, _, named = layouts.parse_labels(layouts.read_csv_bytes(labels))
        matched, missing, orphans = layouts.match_images(
            rows, layouts.find_images(images_dir), named
        )
    except layouts.ConvertError as e:
        raise PredictError(str(e)) from e
    for entry in skipped + missing + orphans:
        where = f"line {entry['row']}" if entry["row"] else entry["path"]
        print(f"skipped {entry['id']} ({where}): {entry['reason']}", file=sys.stderr)
    return [
        {"id": r.image_id, "path": r.path, "male": float(r.male), "boneage": r.boneage}
        for r in matched
    ]


def list_inputs(
    paths: Sequence[str], sex: str, labels: str, images_dir: str
) -> list[dict[str, Any]]:
    """Returns the images to predict: IMAGE files with one --sex, or --labels with --images.

    `male` is None for IMAGE files when no --sex was given.
    """
    if labels or images_dir:
        if not (labels and images_dir) or paths:
            raise UsageError("use either IMAGE files or --labels CSV with --images DIR")
        if sex:
            raise UsageError("--sex is for IMAGE files; with --labels each row gives the sex")
        return labeled_items(labels, images_dir)
    if not paths:
        raise UsageError("no images: give IMAGE files or --labels CSV --images DIR")
    male = parse_sex(sex) if sex else None
    for path in paths:
        if tf.io.gfile.isdir(path):
            raise PredictError(
                f"{path} is a folder: give image files (e.g. {path.rstrip('/')}/*.png), or "
                f"--labels CSV --images {path}"
            )
    return [
        {
            "id": posixpath.splitext(posixpath.basename(p))[0],
            "path": p,
            "male": male,
            "boneage": None,
        }
        for p in paths
    ]


def format_rows(rows: Sequence[dict[str, Any]], as_csv: bool) -> str:
    """Returns the predictions as CSV text or as an aligned table for the terminal."""
    labeled = any(r["boneage"] is not None for r in rows)
    columns = ["id", "path", "male", "predicted_months"] + (["boneage", "error"] if labeled else [])
    if as_csv:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            extra = [r["boneage"], r["error"]] if labeled else []
            writer.writerow([r["id"], r["path"], r["male"], repr(r["predicted"]), *extra])
        return buf.getvalue()
    lines = [
        f"{'id':<20} {'sex':>3} {'months':>8} {'years':>6}"
        + ("  boneage   error" if labeled else "")
    ]
    for r in rows:
        line = f"{r['id']:<20} {'M' if r['male'] else 'F':>3} {r['predicted']:8.1f} {r['predicted'] / 12:6.1f}"
        if r["boneage"] is not None:
            line += f"  {r['boneage']:7.1f} {r['error']:+7.1f}"
        lines.append(line)
    return "\n".join(lines) + "\n"
