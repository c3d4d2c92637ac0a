"""Writes a synthetic bone-age data set ("phantom") in the layouts of the RSNA 2017 release.

    boneage-make-phantom --output /tmp/phantom --num_images 1000
    boneage-make-phantom --output /tmp/val --num_images 200 --layout rsna_validation
    boneage-make-phantom --age_grid 16 --contact_sheet docs/phantom_contact_sheet.png

Each image is a Greulich-Pyle-like left hand drawn from its *true* bone age and sex
(`boneage_tpu.phantom.anatomy` scene model, `boneage_tpu.phantom.render` renderer); (age, sex) follow the
histogram of the 12,611 official RSNA training labels (embedded in `boneage_tpu.phantom.dataset`).
The *written* label adds rater noise (`--label_noise_months`, default sigma 5), rounded and
clipped to 1..228 months, so a model has an irreducible error floor as on the real data;
`generate()` returns both values.

Layouts (file names mirror the official release / its Kaggle copy; ids count up from 1377,
50001 and 90001 respectively):
  kaggle           DIR/boneage-training-dataset.csv      id,boneage,male (True/False)
                   DIR/boneage-training-dataset/<id>.png
  rsna_validation  DIR/Validation Dataset.csv            Image ID,male,Bone Age (months)
                   DIR/boneage-validation-dataset/<id>.png           (male as TRUE/FALSE)
  rsna_test        DIR/boneage-test-dataset.csv          Case ID,Sex (M/F), no labels
                   DIR/Bone age ground truth.csv         Case ID,Sex,Ground truth bone age (months)
                   DIR/boneage-test-dataset/<id>.png

Output is deterministic: image i depends only on (--seed, i), not on --num_workers, and the
PNG bytes are identical between runs. Images are 8-bit grayscale PNGs of about --width x
--height pixels (each side drawn independently within +-size_jitter).
"""

from __future__ import annotations

import dataclasses

from boneage_tpu.cli import option
from boneage_tpu.phantom.dataset import LAYOUTS, PhantomError, PhantomRecord, generate, plan_records
from boneage_tpu.phantom.render import render_phantom
from boneage_tpu.phantom.sheet import sheet_from_age_grid, sheet_from_records, write_contact_sheet

__all__ = [
    "LAYOUTS",
    "PhantomConfig",
    "PhantomError",
    "PhantomRecord",
    "generate",
    "plan_records",
    "render_phantom",
    "run",
    "sheet_from_age_grid",
    "sheet_from_records",
    "write_contact_sheet",
]


@dataclasses.dataclass
class PhantomConfig:
    """Command-line settings of `boneage-make-phantom`."""

    output: str = option("", "Folder to write the data set into (created if missing).")
    num_images: int = option(1000, "Number of images.", min=1, max=10**8)
    seed: int = option(0, "Random seed; image i depends only on (seed, i).", min=0, max=2**63 - 1)
    width: int = option(640, "Nominal image width in pixels.", min=64, max=16384)
    height: int = option(800, "Nominal image height in pixels.", min=64, max=16384)
    size_jitter: float = option(
        0.1, "Each side varies by +- this fraction; 0 = exact.", min=0, max=0.49
    )
    layout: str = option("kaggle", "File layout.", choices=tuple(sorted(LAYOUTS)))
    label_noise_months: float = option(5.0, "Sigma of the rater noise.", min=0, max=240)
    num_workers: int = option(0, "Rendering processes; 0 = one per CPU.", min=0, max=4096)
    overwrite: bool = option(False, "Delete PNGs in the image folder this run won't write.")
    contact_sheet: str = option("", "Also write a PNG grid of images sorted by age.")
    contact_sheet_size: int = option(16, "Images on the contact sheet.", min=1, max=10**5)
    age_grid: int = option(
        0, "Sheet of N new hands at ages 0..228 months (no --output).", min=0, max=10**5
    )


def run(config: PhantomConfig) -> list[PhantomRecord]:
    """Generates the data set and/or contact sheet described by `config`.

    Raises:
      PhantomError: bad settings or an unwritable output (one line, for the CLI).
    """
    if config.age_grid < 0 or config.contact_sheet_size < 1:
        raise PhantomError("--age_grid must be >= 0 and --contact_sheet_size >= 1")
    if config.age_grid and not config.contact_sheet:
        raise PhantomError("--age_grid needs --contact_sheet PATH")
    if not config.output and not config.age_grid:
        raise PhantomError("--output is required (or --age_grid N with --contact_sheet PATH)")
    try:
        records = _generate(config) if config.output else []
        if config.age_grid:
            sheet_from_age_grid(
                config.contact_sheet, config.age_grid, config.seed, config.width, config.height
            )
        elif config.contact_sheet:
            sheet_from_records(config.contact_sheet, records, config.contact_sheet_size)
    except OSError as e:  # e.g. disk full while writing; the message names the file
        raise PhantomError(str(e)) from e
    return records


def _generate(config: PhantomConfig) -> list[PhantomRecord]:
    return generate(
        config.output,
        config.num_images,
        seed=config.seed,
        width=config.width,
        height=config.height,
        size_jitter=config.size_jitter,
        layout=config.layout,
        label_noise_months=config.label_noise_months,
        num_workers=config.num_workers,
        overwrite=config.overwrite,
    )
