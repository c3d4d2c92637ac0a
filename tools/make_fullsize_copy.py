"""A full-size copy of the 256-px RSNA training set: 1600x2080 8-bit grey PNGs with film grain.

    python -m tools.make_fullsize_copy --source ../shared/data/rsna-train-256 --output DIR
        [--workers N] [--limit N] [--json PATH]

Writes, in the Kaggle layout, DIR/boneage-training-dataset.csv (the source CSV's lines, labels
unchanged; rows whose image could not be read are left out and listed) and
DIR/boneage-training-dataset/<id>.png: each source image (<id>.jpg or <id>.png) upscaled to
1600 wide x 2080 high (the real full-size images' size; bicubic), plus film-grain-like noise
(slightly blurred Gaussian noise, stronger in bright areas, seeded per id: the same id and
--seed give the same bytes), encoded like the real PNGs (zlib level 6, adaptive filters).
The grain is what makes the copy cost what the real images cost: a plain upscale compresses to
~130 KB and decodes fast; --grain 0.75 gives the real samples' median size (~690 KB) and
one-thread decode time (~21 ms) to within a few per cent.

Size and time: the full set (12,583 images) takes ~9 GB (about 8.2 GiB) of disk and about an
hour on 2 cores (~0.4 s of CPU per image, mostly PNG encoding). It is refused when the
output's disk has less free space than what remains to write. The run is resumable: an image
is written under a temporary name and renamed when complete, so a rerun skips every finished
<id>.png and redoes the rest. --output must lie outside the repository and outside ../shared.

At the end it prints the check: median, p10 and p90 of KB per image and of the decode time
per image (one thread, bytes in memory, `boneage_tpu.images.decode_grayscale`: the
converter's decoder), the real samples (--reference, default ../shared/data/rsna-sample) against
--check_images images of the copy, and whether each median is within +-20 % of the real one.
The decode times are CPU times of one thread, best of 3; they are rough on a busy machine,
so the 1-minute load average is printed beside them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.core.errors import Error, UsageError
from boneage_tpu.data import images

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
DEFAULT_REFERENCE = SHARED / "data" / "rsna-sample"
CSV_NAME = "boneage-training-dataset.csv"
IMAGES_NAME = "boneage-training-dataset"
WIDTH, HEIGHT = 1600, 2080  # The real full-size RSNA samples' size.
# Bytes per image of the copy at the default grain (measured: ~680 KB), for the disk check.
BYTES_PER_IMAGE = 700 * 1024
# Where the grain is weakest (black) as a share of its strength at white: film grain (and
# the real samples' noise) is weaker in the dark background than in the hand.
GRAIN_FLOOR = 0.3
TOLERANCE = 0.2  # The copy's medians must be within +-20 % of the real samples'.
DECODE_REPEATS = 3
_TEMP_MARK = ".tmp-"
_PNG_END = b"IEND\xaeB`\x82"


@dataclasses.dataclass
class CopyConfig:
    """Settings of one copy."""

    source: str = option(
        "", "Kaggle-layout folder of the 256-px images (CSV + jpgs).", required=True
    )
    output: str = option(
        "", "Folder to write the copy to (outside the repository and ../shared).", required=True
    )
    workers: int = option(0, "Worker processes (0: one per core).", min=0, max=256)
    limit: int = option(0, "Copy only the first N rows of the CSV (0: all).", min=0, max=10**7)
    grain: float = option(
        0.75,
        "Strength of the film grain: its standard deviation in grey levels at white.",
        min=0.0,
        max=64.0,
    )
    seed: int = option(
        0, "Seed of the grain (combined with each image's id).", min=0, max=2**31 - 1
    )
    reference: str = option(
        str(DEFAULT_REFERENCE), "Folder of real full-size PNGs to check the copy against."
    )
    check_images: int = option(
        50, "Images of the copy timed in the check (0: no check).", min=0, max=10**6
    )
    json: str = option("", "Also write the check's figures to this JSON file.")


class CopyError(Error):
    """A one-line problem with the copy's inputs or output folder."""


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
    return path == folder or folder in path.parents


def check_output(output: str, source: str) -> pathlib.Path:
    """Returns the resolved output folder, refusing one inside the repository, ../shared or the source.

    Raises:
      UsageError: one line naming the folder it lies in.
    """
    path = pathlib.Path(os.path.realpath(os.path.expanduser(output)))
    forbidden = (
        ("the repository", pathlib.Path(os.path.realpath(REPO_ROOT))),
        ("../shared", pathlib.Path(os.path.realpath(SHARED))),
        ("../shared", pathlib.Path(os.path.realpath("../shared"))),
        ("--source", pathlib.Path(os.path.realpath(source))),
    )
    for name, folder in forbidden:
        if _inside(path, folder):
            raise UsageError(
                f"--output {output} lies inside {name} ({folder}): name another folder"
            )
    return path


def read_rows(source: pathlib.Path, limit: int = 0) -> tuple[str, list[tuple[str, str]]]:
    """Reads the source CSV: (header line, [(id, the row's line as written)]), first `limit` rows.

    Raises:
      CopyError: the CSV is missing, unreadable, empty or has no `id` column.
    """
    path = source / CSV_NAME
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise CopyError(f"no {CSV_NAME} in {source} (expected the Kaggle layout)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CopyError(f"cannot read {path}: {e}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise CopyError(f"{path} is empty")
    header = next(csv.reader([lines[0]]))
    if "id" not in header:
        raise CopyError(f"{path} has no id column (header: {lines[0][:200]})")
    column = header.index("id")
    rows = []
    for line in lines[1:]:
        fields = next(csv.reader([line]))
        image_id = fields[column].strip() if len(fields) > column else ""
        # An id names a file: one with a path separator would write outside the copy.
        if (
            image_id
            and "/" not in image_id
            and "\\" not in image_id
            and image_id not in ("..", ".")
        ):
            rows.append((image_id, line))
    return lines[0], rows[:limit] if limit else rows


def grain_rng(image_id: str, seed: int) -> np.random.Generator:
    """The grain's random generator of one image: a function of (seed, id) only."""
    digest = int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def film_grain(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian noise blurred by a 3x3 binomial kernel (grains ~2 px wide).

    White noise would be too cheap to decode (PNG's filters give up on it) and too large;
    slightly correlated noise is what the real images' Paeth-filtered rows look like.
    """
    noise = rng.standard_normal((shape[0] + 2, shape[1] + 2), dtype=np.float32)
    noise = noise[:, :-2] + 2 * noise[:, 1:-1] + noise[:, 2:]
    noise = noise[:-2] + 2 * noise[1:-1] + noise[2:]
    return noise / 6.0  # Sum of the kernel's squared weights is 36.


def full_size(small: np.ndarray, image_id: str, seed: int, grain: float) -> np.ndarray:
    """Upscales a uint8 (height, width) image to 2080x1600 and adds film grain seeded by its id.

    Returns:
      A uint8 (2080, 1600) array.
    """
    big = Image.fromarray(np.ascontiguousarray(small), "L").resize((WIDTH, HEIGHT), Image.BICUBIC)
    values = np.asarray(big, np.float32)
    if grain > 0:
        strength = grain * (GRAIN_FLOOR + (1 - GRAIN_FLOOR) * np.sqrt(values / 255.0))
        values = values + strength * film_grain(values.shape, grain_rng(image_id, seed))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """Encodes like the real RSNA PNGs: 8-bit grey, zlib level 6, libpng's adaptive filters."""
    buffer = io.BytesIO()
    Image.fromarray(image, "L").save(buffer, "PNG", compress_level=images.PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def is_complete(path: pathlib.Path) -> bool:
    """Whether `path` is a finished PNG (renamed from its temp name, so it ends with IEND)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except OSError:
        return False


def source_image(images_dir: pathlib.Path, image_id: str) -> pathlib.Path:
    """The source file of an id: <id>.jpg, else <id>.png (the named .jpg when neither exists)."""
    for suffix in (".jpg", ".png"):
        path = images_dir / f"{image_id}{suffix}"
        if path.exists():
            return path
    return images_dir / f"{image_id}.jpg"


@dataclasses.dataclass(frozen=True)
class Task:
    """One image to copy."""

    image_id: str
    source: str
    target: str
    seed: int
    grain: float


def copy_one(task: Task) -> tuple[str, str]:
    """Writes one full-size image atomically; returns (id, "" or the skip reason)."""
    try:
        small = images.read_grayscale(task.source)
    except images.ImageError as e:
        return task.image_id, str(e)
    data = encode_png(full_size(small, task.image_id, task.seed, task.grain))
    temp = f"{task.target}{_TEMP_MARK}{os.getpid()}"
    try:
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, task.target)
    except OSError as e:
        pathlib.Path(temp).unlink(missing_ok=True)
        return task.image_id, f"cannot write {task.target}: {e}"
    return task.image_id, ""


def _remove_stale_temps(folder: pathlib.Path) -> None:
    """Removes the temp files of an interrupted run (only names this tool makes)."""
    for path in folder.glob(f"*.png{_TEMP_MARK}*"):
        path.unlink(missing_ok=True)


def _check_free_space(folder: pathlib.Path, remaining: int) -> None:
    needed = remaining * BYTES_PER_IMAGE
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise CopyError(
            f"{folder} has {free / 1e9:.1f} GB free; {remaining} images need ~{needed / 1e9:.1f} GB"
        )


def _results(tasks: list[Task], workers: int) -> Iterator[tuple[str, str]]:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(copy_one, tasks)
        return
    # Forked workers: nothing heavy is imported here (no TensorFlow), and fork costs nothing.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap_unordered(copy_one, tasks, chunksize=4)


class _Progress:
    """A progress line every `every` seconds and at the end."""

    def __init__(self, total: int, every: float = 30.0) -> None:
        self.total, self.every = total, every
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate / 60 if rate else 0.0
            print(
                f"make_fullsize_copy: {self.done}/{self.total} written ({self.failed} skipped), "
                f"{rate:.2f} img/s, ~{eta:.0f} min left",
                flush=True,
            )


def make_copy(config: CopyConfig) -> dict[str, Any]:
    """Writes (or completes) the copy; returns counts and the skipped images with reasons."""
    output = check_output(config.output, config.source)
    source = pathlib.Path(config.source)
    header, rows = read_rows(source, config.limit)
    source_images = source / IMAGES_NAME
    if not source_images.is_dir():
        raise CopyError(f"no {IMAGES_NAME}/ folder in {source} (expected the Kaggle layout)")
    out_images = output / IMAGES_NAME
    out_images.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_images)
    tasks, done = [], set()
    for image_id, _ in rows:
        target = out_images / f"{image_id}.png"
        if is_complete(target):
            done.add(image_id)
            continue
        path = source_image(source_images, image_id)
        tasks.append(Task(image_id, str(path), str(target), config.seed, config.grain))
    _check_free_space(out_images, len(tasks))
    workers = config.workers or len(os.sched_getaffinity(0))
    print(
        f"make_fullsize_copy: {len(rows)} images, {len(done)} already done, "
        f"{len(tasks)} to write with {workers} worker(s) into {out_images}",
        flush=True,
    )
    skipped: dict[str, str] = {}
    progress = _Progress(len(tasks))
    for image_id, reason in _results(tasks, workers):
        if reason:
            skipped[image_id] = reason
        else:
            done.add(image_id)
        progress.update(bool(reason))
    # The CSV last, so that a copy with a CSV has its images; the rows keep the source's text.
    lines = [header] + [line for image_id, line in rows if image_id in done]
    temp = output / f"{CSV_NAME}{_TEMP_MARK}{os.getpid()}"
    temp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(temp, output / CSV_NAME)
    if skipped:
        print(f"make_fullsize_copy: skipped {len(skipped)} image(s):")
        for image_id, reason in sorted(skipped.items()):
            print(f"  {image_id}: {reason}")
    return {"images": len(done), "written": len(tasks) - len(skipped), "skipped": skipped}


def decode_ms(data: bytes, repeats: int = DECODE_REPEATS) -> float:
    """One-thread CPU ms to decode an image with the converter's decoder (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        images.decode_grayscale(data)
        best = min(best, time.thread_time() - start)
    return 1000 * best


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Median, p10 and p90 of `values`."""
    p10, median, p90 = np.percentile(np.asarray(values, np.float64), [10, 50, 90])
    return {
        "median": round(float(median), 2),
        "p10": round(float(p10), 2),
        "p90": round(float(p90), 2),
    }


def measure(paths: Sequence[pathlib.Path]) -> dict[str, Any]:
    """KB per image and decode ms per image of PNG files (unreadable ones are left out)."""
    kb, ms = [], []
    for path in paths:
        try:
            data = path.read_bytes()
            ms.append(decode_ms(data))
        except (OSError, images.ImageError):
            continue
        kb.append(len(data) / 1024)
    if not kb:
        return {"images": 0}
    return {"images": len(kb), "kb": distribution(kb), "decode_ms": distribution(ms)}


def _spread(paths: list[pathlib.Path], count: int) -> list[pathlib.Path]:
    """`count` paths evenly spread over `paths` (the whole copy's mix, not its first ids)."""
    if len(paths) <= count:
        return paths
    return (
        [paths[round(k * (len(paths) - 1) / (count - 1))] for k in range(count)]
        if count > 1
        else paths[:1]
    )


def check(config: CopyConfig) -> dict[str, Any]:
    """Measures the copy against the real samples and prints both distributions."""
    output = pathlib.Path(config.output)
    _, rows = read_rows(output)
    copies = _spread([output / IMAGES_NAME / f"{i}.png" for i, _ in rows], config.check_images)
    reference = pathlib.Path(config.reference)
    real_paths = sorted((reference / IMAGES_NAME).glob("*.png")) or sorted(reference.glob("*.png"))
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"real": measure(real_paths), "copy": measure(copies)}
    result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["grain"], result["seed"] = config.grain, config.seed
    print(_report(result, reference))
    return result


def _report(result: dict[str, Any], reference: pathlib.Path) -> str:
    real, copy = result["real"], result["copy"]
    lines = ["                  KB/image median  p10   p90 | decode ms/image median  p10   p90"]
    for name, figures in (("real", real), ("copy", copy)):
        if not figures["images"]:
            lines.append(f"{name:>6} (0 images)")
            continue
        kb, ms = figures["kb"], figures["decode_ms"]
        lines.append(
            f"{name:>6} ({figures['images']:>4} img) {kb['median']:>9.0f} {kb['p10']:>5.0f} "
            f"{kb['p90']:>5.0f} | {ms['median']:>22.1f} {ms['p10']:>5.1f} {ms['p90']:>5.1f}"
        )
    if not real["images"]:
        lines.append(f"no real PNGs in {reference}: nothing to check against")
    elif copy["images"]:
        for key, label in (("kb", "size"), ("decode_ms", "decode time")):
            ratio = copy[key]["median"] / real[key]["median"] - 1
            result[f"{key}_median_within_20pct"] = abs(ratio) <= TOLERANCE
            verdict = "within" if abs(ratio) <= TOLERANCE else "NOT within"
            lines.append(f"median {label}: copy {ratio:+.1%} vs real, {verdict} +-20 %")
    before, after = result["load_average_1min"]
    lines.append(
        f"load average (1 min) {before:.2f} before, {after:.2f} after"
        + (": decode times are rough on a busy machine" if max(before, after) > 0.5 else "")
    )
    return "\n".join(lines)


def _job(config: CopyConfig) -> None:
    summary = make_copy(config)
    if config.check_images:
        summary["check"] = check(config)
    if config.json:
        pathlib.Path(config.json).write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the copy from a command line; returns the exit status (0, 1 failed, 2 bad flags)."""
    return cli.main("make_fullsize_copy", CopyConfig, _job, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
