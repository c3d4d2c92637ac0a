"""Contact sheet: a captioned PNG grid of radiographs, for checking maturity progression by eye."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from boneage_tpu.phantom.dataset import MAX_LABEL, PhantomRecord
from boneage_tpu.phantom.render import render_phantom

_CAPTION_PX = 22


def write_contact_sheet(
    path: str,
    tiles: Sequence[tuple[np.ndarray, str]],
    *,
    columns: int = 4,
    tile_height: int = 240,
) -> None:
    """Writes `tiles` (uint8 image, caption) as a grid PNG, in the given order.

    Args:
      path: local PNG path; its folder is created if missing.
      tiles: images of any size (scaled to `tile_height`, aspect kept) and their captions.
      columns: tiles per row.
      tile_height: image height of one tile in pixels (the caption adds a band below).

    Raises:
      ValueError: no tiles.
      OSError: the file cannot be written.
    """
    if not tiles:
        raise ValueError("a contact sheet needs at least one image")
    tile_width = round(tile_height * 0.8)
    rows = -(-len(tiles) // columns)
    cell_h = tile_height + _CAPTION_PX
    sheet = Image.new("L", (columns * tile_width, rows * cell_h), 255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    for i, (pixels, caption) in enumerate(tiles):
        image = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L")
        image.thumbnail((tile_width, tile_height), Image.Resampling.LANCZOS)
        row, col = divmod(i, columns)
        x = col * tile_width + (tile_width - image.width) // 2
        y = row * cell_h + (tile_height - image.height) // 2
        sheet.paste(image, (x, y))
        draw.text((col * tile_width + 4, row * cell_h + tile_height + 3), caption, 0, font=font)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    sheet.save(path, format="PNG", optimize=True)


def age_grid(num: int) -> list[tuple[float, bool]]:
    """Returns `num` (age, male) pairs evenly spaced over 0..228 months, alternating sex."""
    ages = np.linspace(0.0, MAX_LABEL, num) if num > 1 else np.array([MAX_LABEL / 2.0])
    return [(float(a), i % 2 == 0) for i, a in enumerate(ages)]


def pick_for_sheet(records: Sequence[PhantomRecord], num: int) -> list[PhantomRecord]:
    """Picks up to `num` records spread evenly over their age range, sorted by true age."""
    pool = sorted(records, key=lambda r: r.true_age_months)
    if len(pool) <= num:
        return pool
    targets = np.linspace(pool[0].true_age_months, pool[-1].true_age_months, num)
    chosen: list[PhantomRecord] = []
    for target in targets:
        rest = [r for r in pool if r not in chosen]
        chosen.append(min(rest, key=lambda r: abs(r.true_age_months - target)))
    return sorted(chosen, key=lambda r: r.true_age_months)


def sheet_from_records(path: str, records: Sequence[PhantomRecord], num: int = 16) -> None:
    """Writes a contact sheet of up to `num` generated images sorted by true age."""
    tiles = []
    for r in pick_for_sheet(records, num):
        with Image.open(r.path) as im:
            pixels = np.asarray(im.convert("L"))
        sex = "M" if r.male else "F"
        tiles.append((pixels, f"{sex} label {r.label_months} (true {r.true_age_months:.0f})"))
    write_contact_sheet(path, tiles)


def sheet_from_age_grid(path: str, num: int, seed: int, width: int, height: int) -> None:
    """Renders `num` hands at evenly spaced true ages 0..228 months into a contact sheet."""
    tiles = []
    for i, (age, male) in enumerate(age_grid(num)):
        pixels = render_phantom(age, male, seed * 1000 + i, width, height)
        tiles.append((pixels, f"{'M' if male else 'F'} {age:.0f} months"))
    write_contact_sheet(path, tiles)
