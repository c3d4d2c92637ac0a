"""Phantom data sets on disk: RSNA-like (age, sex) sampling, rater-noise labels, file layouts.

See `boneage-make-phantom` for the layouts and the command line; `generate()` is the Python API.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from boneage_tpu.core import guard
from boneage_tpu.core.errors import Error
from boneage_tpu.phantom.render import render_phantom

MIN_LABEL, MAX_LABEL = 1, 228
AGE_BIN_MONTHS = 6
# Counts of the official RSNA training labels per 6-month bin (0-6, ..., 222-228 incl.).
_RSNA_COUNTS = {
    False: (1, 6, 13, 18, 42, 51, 76, 49, 104, 15, 147, 196, 68, 383, 105, 498, 113, 479, 61,
            13, 642, 126, 697, 106, 546, 87, 418, 212, 156, 24, 205, 12, 61, 3, 27, 2, 16, 0),
    True: (1, 5, 22, 25, 55, 27, 50, 56, 75, 110, 145, 43, 228, 60, 228, 46, 253, 51, 311, 59,
           364, 78, 428, 434, 125, 642, 772, 545, 744, 78, 222, 142, 115, 30, 174, 13, 56, 21),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Layout:
    """File names and CSV format of one RSNA release layout."""

    csv_name: str
    image_dir: str
    header: tuple[str, ...]
    first_id: int
    truth_csv: str = ""  # separate ground-truth file (test layout)


LAYOUTS = {
    "kaggle": Layout(
        "boneage-training-dataset.csv", "boneage-training-dataset", ("id", "boneage", "male"), 1377
    ),
    "rsna_validation": Layout(
        "Validation Dataset.csv",
        "boneage-validation-dataset",
        ("Image ID", "male", "Bone Age (months)"),
        50001,
    ),
    "rsna_test": Layout(
        "boneage-test-dataset.csv",
        "boneage-test-dataset",
        ("Case ID", "Sex"),
        90001,
        truth_csv="Bone age ground truth.csv",
    ),
}


class PhantomError(Error, ValueError):
    """Bad arguments or an unusable output folder (reported as one line by the CLI)."""


@dataclasses.dataclass(frozen=True)
class PhantomRecord:
    """One generated image: the written (noisy) label and the true bone age it was drawn from."""

    image_id: str
    male: bool
    true_age_months: float
    label_months: int
    width: int
    height: int
    path: str
    render_seed: int


def sample_age_sex(rng: np.random.Generator) -> tuple[float, bool]:
    """Draws (true bone age in months, male) from the RSNA training-label histogram."""
    counts = np.array(_RSNA_COUNTS[False] + _RSNA_COUNTS[True], dtype=np.float64)
    cell = int(rng.choice(counts.size, p=counts / counts.sum()))
    male, bin_index = divmod(cell, len(_RSNA_COUNTS[False]))
    age = (bin_index + float(rng.uniform())) * AGE_BIN_MONTHS
    return age, bool(male)


def noisy_label(true_age: float, noise_months: float, rng: np.random.Generator) -> int:
    """Returns the rater's label: true age + N(0, noise), rounded and clipped to 1..228."""
    value = true_age + noise_months * float(rng.standard_normal())
    return int(min(max(round(value), MIN_LABEL), MAX_LABEL))


def plan_records(
    output: str,
    num_images: int,
    *,
    seed: int = 0,
    width: int = 640,
    height: int = 800,
    size_jitter: float = 0.1,
    layout: str = "kaggle",
    label_noise_months: float = 5.0,
) -> list[PhantomRecord]:
    """Returns the records `generate` would write, without rendering anything."""
    _check_args(num_images, width, height, size_jitter, layout, label_noise_months)
    spec = LAYOUTS[layout]
    records = []
    for index in range(num_images):
        case_ss, render_ss = np.random.SeedSequence([seed, index]).spawn(2)
        rng = np.random.default_rng(case_ss)
        age, male = sample_age_sex(rng)
        label = noisy_label(age, label_noise_months, rng)
        w, h = (
            round(n * (1.0 + size_jitter * (2.0 * rng.uniform() - 1.0))) for n in (width, height)
        )
        image_id = str(spec.first_id + index)
        records.append(
            PhantomRecord(
                image_id=image_id,
                male=male,
                true_age_months=age,
                label_months=label,
                width=int(w),
                height=int(h),
                path=os.path.join(output, spec.image_dir, f"{image_id}.png"),
                render_seed=int(render_ss.generate_state(1, np.uint64)[0]),
            )
        )
    return records


def _check_args(
    num_images: int,
    width: int,
    height: int,
    size_jitter: float,
    layout: str,
    label_noise_months: float,
) -> None:
    if num_images < 1:
        raise PhantomError(f"num_images must be >= 1, got {num_images}")
    if min(width, height) < 64:
        raise PhantomError(f"width and height must be >= 64 pixels, got {width}x{height}")
    if not 0.0 <= size_jitter < 0.5:
        raise PhantomError(f"size_jitter must be in [0, 0.5), got {size_jitter}")
    if layout not in LAYOUTS:
        raise PhantomError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if not label_noise_months >= 0.0:
        raise PhantomError(f"label_noise_months must be >= 0, got {label_noise_months}")


def _render_to_file(record: PhantomRecord) -> None:
    pixels = render_phantom(
        record.true_age_months, record.male, record.render_seed, record.width, record.height
    )
    # Fixed encoder settings and no metadata chunks: the same pixels give the same bytes.
    Image.fromarray(pixels, mode="L").save(record.path, format="PNG", compress_level=1)


def _prepare_output(output: str, layout: Layout, records: Sequence[PhantomRecord], overwrite: bool):
    if "://" in output:
        raise PhantomError(f"--output must be a local folder, got {output}; copy it with gsutil")
    image_dir = os.path.join(output, layout.image_dir)
    try:
        os.makedirs(image_dir, exist_ok=True)
    except OSError as e:
        raise PhantomError(f"cannot create {image_dir}: {e.strerror}") from e
    if not os.access(image_dir, os.W_OK):
        raise PhantomError(f"cannot write to {image_dir}: permission denied")
    wanted = {os.path.basename(r.path) for r in records}
    stale = sorted(n for n in os.listdir(image_dir) if n.endswith(".png") and n not in wanted)
    if stale and not overwrite:
        raise PhantomError(
            f"{image_dir} holds {len(stale)} PNGs that this run would not write (e.g. {stale[0]}):"
            " use an empty --output or pass --overwrite to delete them"
        )
    for name in stale:
        os.remove(os.path.join(image_dir, name))


def _write_csvs(output: str, layout_name: str, records: Sequence[PhantomRecord]) -> None:
    spec = LAYOUTS[layout_name]

    def write(name: str, header: Sequence[str], rows) -> None:
        with open(os.path.join(output, name), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(guard.csv_row(row) for row in rows)  # Generated ids; see guard.

    if layout_name == "kaggle":
        write(spec.csv_name, spec.header, [(r.image_id, r.label_months, r.male) for r in records])
    elif layout_name == "rsna_validation":
        rows = [(r.image_id, str(r.male).upper(), r.label_months) for r in records]
        write(spec.csv_name, spec.header, rows)
    else:
        sex = {True: "M", False: "F"}
        write(spec.csv_name, spec.header, [(r.image_id, sex[r.male]) for r in records])
        truth_header = (*spec.header, "Ground truth bone age (months)")
        write(
            spec.truth_csv,
            truth_header,
            [(r.image_id, sex[r.male], r.label_months) for r in records],
        )


def _start_method() -> str:
    """Picks fork (works from unguarded scripts) unless TensorFlow's threads are running.

    Forking a process that runs TensorFlow thread pools can deadlock the child; spawn is safe
    there but re-imports the caller's main module, which then needs `if __name__ == "__main__"`.
    """
    return "spawn" if "tensorflow" in sys.modules else "fork"


def default_workers() -> int:
    """Returns the number of CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def generate(
    output: str,
    num_images: int,
    *,
    seed: int = 0,
    width: int = 640,
    height: int = 800,
    size_jitter: float = 0.1,
    layout: str = "kaggle",
    label_noise_months: float = 5.0,
    num_workers: int = 0,
    overwrite: bool = False,
) -> list[PhantomRecord]:
    """Writes a phantom data set into `output` (created if missing) and returns its records.

    Args:
      output: local folder; PNGs and CSVs are written in the `layout` (see module docstring).
      num_images: number of images.
      seed: image i depends only on (seed, i).
      width, height: nominal image size; each side varies by +-size_jitter (0 = exact).
      layout: kaggle | rsna_validation | rsna_test.
      label_noise_months: sigma of the rater noise added to the written labels.
      num_workers: rendering processes; 0 = one per CPU, 1 = in this process.
      overwrite: delete PNGs in the image folder that this run does not write.

    Raises:
      PhantomError: bad arguments or an unusable output folder.
    """
    records = plan_records(
        output,
        num_images,
        seed=seed,
        width=width,
        height=height,
        size_jitter=size_jitter,
        layout=layout,
        label_noise_months=label_noise_months,
    )
    if num_workers < 0:
        raise PhantomError(f"num_workers must be >= 0, got {num_workers}")
    _prepare_output(output, LAYOUTS[layout], records, overwrite)
    workers = min(num_workers or default_workers(), math.ceil(num_images / 4))
    if workers <= 1:
        for record in records:
            _render_to_file(record)
    else:
        with multiprocessing.get_context(_start_method()).Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_to_file, records, chunksize=4):
                pass
    _write_csvs(output, layout, records)
    return records
