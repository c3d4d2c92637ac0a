"""Labels CSV layouts and image matching (the converter and `predict` share them).

Everything here is deterministic: the same CSV and image listing always give the same rows,
which the converter's plan (`boneage_tpu.convert.plan`) splits and shuffles with its seed; that
is what makes an interrupted conversion resumable with an identical result.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
import os
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf

from boneage_tpu.core import guard, schema
from boneage_tpu.core.errors import Error

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")
MAX_CSV_BYTES = 256 * 2**20  # RSNA's training CSV is 0.3 MB.
_TRUE = frozenset({"true", "1", "1.0", "m", "male"})
_FALSE = frozenset({"false", "0", "0.0", "f", "female"})


class ConvertError(Error, RuntimeError):
    """A fatal converter error; the message is the one line shown to the user."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Column names of one supported CSV layout (lower-case, spaces collapsed)."""

    name: str
    id_column: str
    sex_column: str
    age_columns: tuple[str, ...]  # The first one present is used.
    age_required: bool


LAYOUTS = (
    Layout("kaggle", "id", "male", ("boneage",), True),
    Layout("rsna_validation", "image id", "male", ("bone age (months)",), True),
    Layout(
        "rsna_test",
        "case id",
        "sex",
        ("ground truth bone age (months)", "bone age (months)", "boneage"),
        False,
    ),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One usable CSV row, matched to its image file."""

    line: int  # Line number in the CSV; the header is line 1.
    image_id: str
    boneage: float | None  # None: unlabeled.
    male: bool
    path: str = ""

    @property
    def stratum(self) -> int:
        """Age band x sex stratum; -1 when unlabeled."""
        return -1 if self.boneage is None else schema.stratum(self.boneage, self.male)


def skip(line: int | None, image_id: str, path: str, reason: str) -> dict[str, Any]:
    """Returns one manifest `skipped` entry; the reason is folded to one line (summary table)."""
    # Names are escaped here, once for every report (summary, manifest, predict's stderr): a
    # terminal escape sequence or a non-UTF-8 byte in a file name is shown, never run.
    return {
        "row": line,
        "id": guard.printable(image_id),
        "path": guard.printable(path),
        "reason": guard.printable(" ".join(reason.split())),
    }


def read_csv_bytes(labels_csv: str) -> bytes:
    """Reads the labels CSV (local or gs://), checked first (`guard.read_file`): one-line errors."""
    try:
        return guard.read_file(labels_csv, MAX_CSV_BYTES, "a labels CSV")
    except guard.InputFileError as e:
        raise ConvertError(str(e)) from e


def _normalise(column: str) -> str:
    return " ".join(column.strip().lower().split())


def detect_layout(header: Sequence[str]) -> tuple[Layout, dict[str, int]]:
    """Picks the layout from a header; returns it with the column index of id, sex and age."""
    columns = [_normalise(c) for c in header]
    for layout in LAYOUTS:
        if layout.id_column not in columns:
            continue
        index = {"id": columns.index(layout.id_column)}
        missing = [] if layout.sex_column in columns else [layout.sex_column]
        if layout.sex_column in columns:
            index["sex"] = columns.index(layout.sex_column)
        ages = [c for c in layout.age_columns if c in columns]
        if ages:
            index["age"] = columns.index(ages[0])
        elif layout.age_required:
            missing.append(layout.age_columns[0])
        if missing:
            raise ConvertError(
                f"labels CSV looks like the {layout.name} layout but lacks column(s) {missing}; "
                f"header is {list(header)}"
            )
        return layout, index
    raise ConvertError(
        f"cannot detect the CSV layout from header {list(header)}: expected Kaggle "
        "(id, boneage, male), RSNA validation (Image ID, male, Bone Age (months)) or "
        "RSNA test (Case ID, Sex[, Ground truth bone age (months)])"
    )


def _parse_age(text: str, required: bool) -> tuple[float | None, str]:
    """Returns (age or None, skip reason or '')."""
    value = text.strip()
    if not value:
        return None, "missing bone age" if required else ""
    try:
        age = float(value)
    except ValueError:
        return None, f"non-numeric bone age {value!r}"
    if not math.isfinite(age):
        return None, f"bone age {value!r} is not a finite number"
    if age < 0:
        return None, f"negative bone age {value}"
    if age > schema.MAX_AGE_MONTHS:
        return None, f"bone age {value} months is above {schema.MAX_AGE_MONTHS:g}"
    return age, ""


def _parse_sex(text: str) -> tuple[bool, str]:
    value = text.strip().lower()
    if value in _TRUE:
        return True, ""
    if value in _FALSE:
        return False, ""
    return False, "missing sex value" if not value else f"unknown sex value {text.strip()!r}"


def _id_problem(image_id: str) -> str:
    if not image_id:
        return "empty id"
    if "/" in image_id or "\\" in image_id or ".." in image_id or image_id in (".",):
        return f"id {image_id!r} contains a path separator or '..'"
    return ""


def parse_labels(data: bytes) -> tuple[Layout, list[Row], list[dict[str, Any]], int, set[str]]:
    """Parses and validates the labels CSV (a UTF-8 BOM and CRLF line ends are accepted).

    Returns:
      (layout, valid rows, skipped entries, number of data rows, every id named by a row).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConvertError(f"labels CSV is not UTF-8 text: {e}") from e
    if not text.strip():
        raise ConvertError("labels CSV is empty")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        layout, index = detect_layout(header)
        records = [(reader.line_num, fields) for fields in reader if any(f.strip() for f in fields)]
    except csv.Error as e:
        raise ConvertError(f"labels CSV line {reader.line_num} is not valid CSV: {e}") from e
    if not records:
        raise ConvertError("labels CSV has a header but no data rows")
    rows, skipped, named = [], [], set()
    for line, fields in records:
        image_id = fields[index["id"]].strip() if len(fields) > index["id"] else ""
        named.add(image_id)
        reason = ""
        if len(fields) != len(header):
            reason = f"row has {len(fields)} fields, the header has {len(header)}"
        reason = reason or _id_problem(image_id)
        age, age_reason = (None, "")
        if "age" in index and not reason:
            age, age_reason = _parse_age(fields[index["age"]], layout.age_required)
        reason = reason or age_reason
        male, sex_reason = (False, "") if reason else _parse_sex(fields[index["sex"]])
        reason = reason or sex_reason
        if reason:
            skipped.append(skip(line, image_id, "", reason))
        else:
            rows.append(Row(line, image_id, age, male))
    rows, duplicates = _drop_duplicates(rows)
    return layout, rows, skipped + duplicates, len(records), named


def _drop_duplicates(rows: list[Row]) -> tuple[list[Row], list[dict[str, Any]]]:
    """Keeps the first of identical duplicates; drops every row of an id with conflicting values."""
    by_id: dict[str, list[Row]] = collections.defaultdict(list)
    for row in rows:
        by_id[row.image_id].append(row)
    kept, skipped = [], []
    for row in rows:
        group = by_id[row.image_id]
        if len(group) == 1:
            kept.append(row)
            continue
        lines = ", ".join(str(r.line) for r in group)
        conflicting = len({(r.boneage, r.male) for r in group}) > 1
        if conflicting:
            skipped.append(
                skip(
                    row.line,
                    row.image_id,
                    "",
                    f"duplicate id with conflicting values on lines {lines}",
                )
            )
        elif row is group[0]:
            kept.append(row)
        else:
            skipped.append(
                skip(
                    row.line, row.image_id, "", f"duplicate id, first seen on line {group[0].line}"
                )
            )
    return kept, skipped


def find_images(images_dir: str) -> dict[str, list[str]]:
    """Lists image files under `images_dir` (recursively, via `tf.io.gfile`) by id (file stem)."""
    if not tf.io.gfile.isdir(images_dir):
        raise ConvertError(f"images folder not found: {images_dir}")
    found: dict[str, list[str]] = collections.defaultdict(list)
    # Local folders through os.walk: tf.io.gfile.walk fails on a non-UTF-8 file name, os.walk
    # keeps it (surrogate-escaped), so it becomes one itemised entry instead of a traceback.
    walk = tf.io.gfile.walk if "://" in images_dir else _local_walk
    for folder, _, files in walk(images_dir):
        for name in files:
            stem, ext = posixpath.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                found[stem].append(f"{folder.rstrip('/')}/{name}")
    if not found:
        raise ConvertError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {images_dir}")
    return {stem: sorted(paths) for stem, paths in found.items()}


def _local_walk(top: str) -> Iterable[tuple[str, list[str], list[str]]]:
    """`os.walk` following symlinked folders, as `tf.io.gfile.walk` does."""
    return os.walk(top, followlinks=True)


def match_images(
    rows: Iterable[Row], images: dict[str, list[str]], named_ids: set[str]
) -> tuple[list[Row], list[dict[str, Any]], list[dict[str, Any]]]:
    """Attaches each row's image path.

    Returns:
      (rows with a path, skipped rows, images without a CSV row).
    """
    matched, skipped = [], []
    for row in rows:
        paths = images.get(row.image_id, [])
        if not paths:
            skipped.append(skip(row.line, row.image_id, "", "missing image file"))
        elif len(paths) > 1:
            names = ", ".join(posixpath.basename(p) for p in paths)
            skipped.append(
                skip(row.line, row.image_id, "", f"several image files for this id: {names}")
            )
        else:
            matched.append(dataclasses.replace(row, path=paths[0]))
    orphans = [
        skip(None, stem, path, "image has no CSV row")
        for stem in sorted(images)
        if stem not in named_ids
        for path in images[stem]
    ]
    return matched, skipped, orphans
