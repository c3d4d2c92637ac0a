"""Inputs and outputs of the predict command: which images (files or a labels CSV), M/F, tables.

A labels CSV is read with the converter's own parser (`boneage_tpu.data.layouts`), so every layout
the converter accepts (Kaggle, RSNA validation, RSNA test) works here too, with the same
itemised skip reasons.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import sys
import time
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from boneage_tpu.core import guard
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
    for entry in skipped + missing:
        where = f"line {entry['row']}" if entry["row"] else entry["path"]
        print(f"skipped {entry['id']} ({where}): {entry['reason']}", file=sys.stderr)
    if orphans:
        # One line, not one per file: a folder usually holds many images a CSV does not name.
        shown = ", ".join(posixpath.basename(e["path"]) for e in orphans[:3])
        more = f", ... ({len(orphans) - 3} more)" if len(orphans) > 3 else ""
        print(
            f"not predicted: {len(orphans)} image(s) in {guard.printable(images_dir)} have no row "
            f"in the CSV ({shown}{more})",
            file=sys.stderr,
        )
    if not matched:
        raise PredictError(
            f"no image to predict: every row of {guard.printable(labels)} was skipped (listed "
            "above)"
        )
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
        # os.path for local paths: tf.io.gfile fails on a non-UTF-8 name (the read is checked).
        if os.path.isdir(path) if "://" not in path else tf.io.gfile.isdir(path):
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


def _columns(labeled: bool, interval: bool = False) -> list[str]:
    return (
        ["id", "path", "male", "predicted_months"]
        + (["low_months", "high_months"] if interval else [])
        + (["boneage", "error"] if labeled else [])
    )


def _csv_row(r: dict[str, Any], labeled: bool) -> list[Any]:
    # Text cells are neutralised (`guard.csv_cell`: an id like `=2+5` is no formula); the
    # numbers stay numbers.
    extra = [r["boneage"], r["error"]] if labeled else []
    bounds = [repr(r["low_months"]), repr(r["high_months"])] if "low_months" in r else []
    cells = [guard.printable(r["id"]), guard.printable(r["path"])]
    return [*guard.csv_row(cells), r["male"], repr(r["predicted"]), *bounds, *extra]


def _table_header(labeled: bool, interval: bool = False) -> str:
    return (
        f"{'id':<20} {'sex':>3} {'months':>8} {'years':>6}"
        + (f" {'interval (months)':>17}" if interval else "")
        + ("  boneage   error" if labeled else "")
    )


def _table_line(r: dict[str, Any]) -> str:
    name = guard.printable(r["id"])
    line = f"{name:<20} {'M' if r['male'] else 'F':>3} {r['predicted']:8.1f} {r['predicted'] / 12:6.1f}"
    if "low_months" in r:
        bounds = f"{r['low_months']:.1f}–{r['high_months']:.1f}"
        line += f" {bounds:>17}"
    if r["boneage"] is not None:
        line += f"  {r['boneage']:7.1f} {r['error']:+7.1f}"
    return line


def format_rows(rows: Sequence[dict[str, Any]], as_csv: bool) -> str:
    """Returns the predictions as CSV text or as an aligned table for the terminal."""
    buf = io.StringIO()
    RowWriter(buf, as_csv).write(list(rows), any(r["boneage"] is not None for r in rows))
    return buf.getvalue()


class RowWriter:
    """Writes predictions as they come: the header before the first rows, flushed per call."""

    def __init__(self, stream: Any, as_csv: bool) -> None:
        """Writes to `stream` (a text file) as CSV or as the terminal's aligned table."""
        self.stream, self.as_csv, self.count = stream, as_csv, 0
        self._csv = csv.writer(stream, lineterminator="\n") if as_csv else None

    def write(self, rows: list[dict[str, Any]], labeled: bool) -> None:
        """Writes rows (with the header first, once); `labeled` adds boneage and error.

        Rows with `low_months`/`high_months` (predict --interval) add those columns.
        """
        interval = bool(rows) and "low_months" in rows[0]
        if self._csv is not None:
            if not self.count:
                self._csv.writerow(_columns(labeled, interval))
            self._csv.writerows(_csv_row(r, labeled) for r in rows)
        else:
            lines = ([_table_header(labeled, interval)] if not self.count else []) + [
                _table_line(r) for r in rows
            ]
            self.stream.write("".join(line + "\n" for line in lines))
        self.count += len(rows)
        self.stream.flush()  # A partial result survives an interruption.


class Progress:
    """A progress line on stderr: updated in place on a terminal, every 10 % otherwise."""

    _MIN_LOGGED = 1000  # Without a terminal, small runs print no progress at all.

    def __init__(self, total: int) -> None:
        """Reports progress over `total` images."""
        self.total, self.start, self.shown = total, time.monotonic(), 0
        self.tty = sys.stderr.isatty()
        self._drawn = False

    def _text(self, done: int) -> str:
        rate = done / max(time.monotonic() - self.start, 1e-9)
        return f"predict: {done}/{self.total} images ({rate:.1f}/s)"

    def update(self, done: int) -> None:
        """Shows that `done` of the images are processed."""
        if self.tty:
            sys.stderr.write("\r" + self._text(done))
            sys.stderr.flush()
            self._drawn = True
        elif self.total >= self._MIN_LOGGED and done * 10 // self.total > self.shown:
            self.shown = done * 10 // self.total
            print(self._text(done), file=sys.stderr, flush=True)

    def clear(self) -> None:
        """Ends the in-place line before other stderr output."""
        if self._drawn:
            sys.stderr.write("\n")
            self._drawn = False

    def close(self) -> None:
        """Ends the progress line."""
        self.clear()
