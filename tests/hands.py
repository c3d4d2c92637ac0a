"""Synthetic hand radiographs of known geometry for the hand-crop tests (NumPy only, no TF)."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom and right exclusive.

BACKGROUND = 25
SOFT_TISSUE = 70
BONE = 160
MARKER = 250


def hand_image(
    height: int = 400, width: int = 320, *, seed: int = 0, inverted: bool = False
) -> tuple[np.ndarray, Box, Box]:
    """A hand (soft tissue with bones, the forearm reaching the bottom) and an L marker.

    The hand spans rows 0.22..1.0 and columns 0.30..0.76 of the image; the marker sits in the
    top-left corner (rows 0.05..0.14, columns 0.05..0.12), outside the hand's box even once
    enlarged by 1.15 about its centre.

    Returns:
      (uint8 image, the hand's exact box, the marker's box).
    """
    rng = np.random.default_rng(seed)
    image = np.full((height, width), float(BACKGROUND))
    rows, cols = np.mgrid[:height, :width] / np.array([height, width])[:, None, None]

    def fill(mask: np.ndarray, value: float) -> None:
        image[mask] = value

    def rect(top: float, left: float, bottom: float, right: float) -> np.ndarray:
        return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)

    fill(rect(0.70, 0.38, 1.01, 0.62), SOFT_TISSUE)  # Forearm.
    fill(((rows - 0.62) / 0.14) ** 2 + ((cols - 0.5) / 0.2) ** 2 < 1, SOFT_TISSUE)  # Palm.
    for centre in (0.33, 0.44, 0.55, 0.66):  # Fingers, tips at row 0.22.
        fill(rect(0.22, centre - 0.0275, 0.62, centre + 0.0275), SOFT_TISSUE)
        fill(rect(0.25, centre - 0.01, 0.62, centre + 0.01), BONE)
    fill(rect(0.45, 0.70, 0.70, 0.76), SOFT_TISSUE)  # Thumb.
    fill(rect(0.48, 0.715, 0.70, 0.745), BONE)
    fill(rect(0.75, 0.42, 1.01, 0.47) | rect(0.75, 0.53, 1.01, 0.58), BONE)  # Radius, ulna.
    fill(rect(0.05, 0.05, 0.14, 0.07) | rect(0.12, 0.05, 0.14, 0.12), MARKER)  # An "L".
    image += rng.normal(0, 2, image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if inverted:
        image = 255 - image
    hand = (_at(0.22, height), _at(0.30, width), height, _at(0.76, width))
    marker = (_at(0.05, height), _at(0.05, width), _at(0.14, height), _at(0.12, width))
    return image, hand, marker


def film_image(size: int = 400, *, seed: int = 0) -> tuple[np.ndarray, Box, Box]:
    """A small film (brighter than the black field around it) holding a small hand.

    Returns:
      (uint8 image, the hand's exact box, the film's box).
    """
    film = (size // 4, size * 3 // 10, size * 17 // 20, size * 3 // 4)
    top, left, bottom, right = film
    inner, hand, _ = hand_image(bottom - top, right - left, seed=seed)
    # The film's background sits well above the field's: a solid bright rectangle.
    image = np.full((size, size), 5, np.uint8)
    image[top:bottom, left:right] = np.clip(inner.astype(np.int16) + 45, 0, 255).astype(np.uint8)
    # Its marker is dropped: it would be part of the film here, not a separate component.
    image[top : top + (bottom - top) // 6, left : left + (right - left) // 6] = BACKGROUND + 45
    hand_in_image = (hand[0] + top, hand[1] + left, hand[2] + top, hand[3] + left)
    return image, hand_in_image, film


def write_hand_dataset(
    root: pathlib.Path, n: int = 6, *, height: int = 200, width: int = 160
) -> tuple[pathlib.Path, pathlib.Path]:
    """n hand PNGs `h0..h{n-1}` in Kaggle layout, the last one inverted (no bright hand: the
    crop keeps it whole), ages spread over the bands; returns (labels CSV, images folder)."""
    folder = root / "images"
    folder.mkdir(parents=True)
    lines = ["id,boneage,male"]
    for i in range(n):
        image, _, _ = hand_image(height, width, seed=i, inverted=i == n - 1)
        Image.fromarray(image).save(folder / f"h{i}.png")
        lines.append(f"h{i},{(i * 37) % 229 + 3},{i % 2 == 0}")
    csv = root / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv, folder


def _at(fraction: float, side: int) -> int:
    return int(np.ceil(fraction * side - 1e-9))
