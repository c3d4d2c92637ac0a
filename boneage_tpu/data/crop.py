"""The hand crop (`--crop hand`): the hand's bounding box in a radiograph, found without a model.

Published bone-age models crop to the hand before resizing (Deeplasia: the bounding box of a
hand mask, enlarged by a crop factor of 1.15), which puts more pixels on the growth plates at
small training sizes. Here the mask is classical, on a copy reduced to about `WORK_SIDE` px:

1. The background level is the histogram's mode (the film or detector area around the hand),
   its noise that of neighbouring pixels near the mode.
2. The mask is every pixel brighter than the background by its noise (`NOISE_SIGMAS`, at least
   `MIN_DELTA` grey levels): low on purpose, because a box that cuts the faint soft tissue of
   a thumb or little finger loses anatomy, while a loose box only loses some zoom.
3. The hand is the mask's largest 8-connected component: markers (L/R letters, initials) and
   specks are separate components and stay out of the box.
4. A near-solid component (`SOLID_FILL` of its box) is a film or collimated field brighter
   than its surround, not a hand: steps 1-3 run again inside it, and the film's own box is
   kept unless they find a hand-sized component (`MIN_MASK_IN_FILM`).
5. A box much smaller than the image is searched again at a finer scale (`ZOOM_FACTOR` around
   it, up to `ZOOM_PASSES` times) and widened to hold what the finer pass finds: at the
   coarse scale the fingers of a small hand are a pixel or two wide.

The box is then enlarged about its centre by the margin and clipped to the image. When no
plausible hand is found (a blank or inverted image, a mask covering nearly all of it, a box
implausibly small) the box is the whole image and `HandBox.fallback` says why: callers count
and report such images, the crop never drops one. Costs a few ms per image (NumPy and Pillow,
no TensorFlow, no SciPy).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

CROPS = ("none", "hand")  # Same values as schema.CROPS (kept TF-free here).
DEFAULT_MARGIN = 1.15  # Deeplasia's crop factor.
MIN_MARGIN, MAX_MARGIN = 1.0, 4.0  # Below 1 the box would cut the hand.
WORK_SIDE = 128  # The mask is found on a copy whose longer side is about this many pixels.
MIN_DELTA = 3  # Grey levels above the background a mask pixel is at least.
NOISE_SIGMAS = 3.0  # ... and background noise standard deviations.
_NOISE_WINDOW = 16  # Grey levels about the mode of the pixels that estimate the noise.
MIN_MASK = 0.02  # The hand covers at least this share of the searched area ...
MAX_MASK = 0.92  # ... and at most this share (else the threshold found no background).
SOLID_FILL = 0.8  # A component filling this share of its box is a film, not a hand.
# A hand found inside a film covers at least this share of it (RSNA films: 20-40 %); less is a
# bright patch of the film (a hand no brighter than its film), and the film's box is kept.
MIN_MASK_IN_FILM = 0.12
_MIN_SOLID_SIDE = 16  # Working pixels a film must span to be searched inside.
_SOLID_INSET = 2  # Working pixels dropped inside a film's edge before searching it.
ZOOM_AREA = 0.5  # A box below this share of the image area is searched again, finer ...
ZOOM_FACTOR = 1.5  # ... within the box enlarged by this factor ...
ZOOM_PASSES = 2  # ... at most this many times.
MIN_BOX_SIDE = 0.25  # The box's longer side is at least this share of the image's longer side.
MIN_IMAGE_SIDE = 16  # Pixels; smaller images are not searched.

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom and right exclusive.


class HandBox(NamedTuple):
    """A crop box in pixels of the image; `fallback` says why it is the whole image, if so."""

    top: int
    left: int
    bottom: int
    right: int
    fallback: str = ""

    @property
    def box(self) -> Box:
        """(top, left, bottom, right), bottom and right exclusive."""
        return self.top, self.left, self.bottom, self.right


def hand_box(image: np.ndarray | Image.Image, margin: float = DEFAULT_MARGIN) -> HandBox:
    """Returns the bounding box of the hand enlarged by `margin`, or the whole image.

    Args:
      image: uint8 (height, width), or a Pillow image of mode L.
      margin: the box's sides are multiplied by this about its centre (then clipped).

    Returns:
      The box; its `fallback` is "" when a hand was found, else the reason the box is the
      whole image.

    Raises:
      ValueError: not an 8-bit single-channel image, or a margin outside MIN..MAX_MARGIN.
    """
    if not MIN_MARGIN <= margin <= MAX_MARGIN:
        raise ValueError(f"margin must be in {MIN_MARGIN}..{MAX_MARGIN}, got {margin}")
    pil = _as_pil(image)
    width, height = pil.size
    whole = (0, 0, height, width)
    if min(width, height) < MIN_IMAGE_SIDE:
        return HandBox(*whole, f"image too small to find a hand in ({width}x{height} px)")
    box, reason = _search(pil)
    if box is None:
        return HandBox(*whole, reason)
    for _ in range(ZOOM_PASSES):
        if _area(box) >= ZOOM_AREA * width * height:
            break
        region = scale_box(box, ZOOM_FACTOR, height, width)
        inner, _ = _search(pil.crop((region[1], region[0], region[3], region[2])))
        if inner is None:
            break
        # The union: the finer pass only adds what the coarse one missed (thin fingers).
        widened = (
            min(box[0], inner[0] + region[0]),
            min(box[1], inner[1] + region[1]),
            max(box[2], inner[2] + region[0]),
            max(box[3], inner[3] + region[1]),
        )
        if widened == box:
            break
        box = widened
    side = max(box[2] - box[0], box[3] - box[1]) / max(width, height)
    if side < MIN_BOX_SIDE:
        return HandBox(*whole, f"no hand found: the largest bright region spans {side:.0%} of it")
    return HandBox(*scale_box(box, margin, height, width))


def crop_image(image: Image.Image, crop: str, margin: float) -> tuple[Image.Image, str]:
    """Applies `crop` (none | hand) to a mode-L image; returns it and the fallback reason.

    The reason is "" when the crop is none or a hand was found; else the image is returned
    whole and the reason says why.

    Raises:
      ValueError: an unknown crop, or a margin outside MIN..MAX_MARGIN.
    """
    if crop == "none":
        return image, ""
    if crop != "hand":
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    found = hand_box(image, margin)
    if found.fallback:
        return image, found.fallback
    return image.crop((found.left, found.top, found.right, found.bottom)), ""


def scale_box(box: Box, factor: float, height: int, width: int) -> Box:
    """Scales a box's sides by `factor` about its centre, rounded and clipped to the image."""
    top, left, bottom, right = box
    centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
    half_h, half_w = (bottom - top) * factor / 2, (right - left) * factor / 2
    return (
        max(0, math.floor(centre_y - half_h)),
        max(0, math.floor(centre_x - half_w)),
        min(height, math.ceil(centre_y + half_h)),
        min(width, math.ceil(centre_x + half_w)),
    )


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels the 8-connected components of a boolean mask (as `scipy.ndimage.label` with a
    3x3 structure, up to the order of the labels).

    Runs of each row are joined to the runs they touch in the row above by union-find: the
    loops are over runs, not pixels, so a working-size mask takes well under a millisecond.

    Returns:
      (labels int32 of the mask's shape, 0 outside it and 1..count inside, count).
    """
    rows, starts, ends, roots = _runs(np.asarray(mask, bool))
    labels = np.zeros(np.shape(mask), np.int32)
    if not len(rows):
        return labels, 0
    _, compact = np.unique(roots, return_inverse=True)
    for row, start, end, value in zip(rows, starts, ends, compact + 1, strict=True):
        labels[row, start:end] = value
    return labels, int(compact.max()) + 1


def _as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        if image.mode != "L":
            raise ValueError(f"expected a mode-L image, got mode {image.mode}")
        return image
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 (height, width) image, got {image.dtype} {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image), "L")


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _search(image: Image.Image) -> tuple[Box | None, str]:
    """Finds the hand's box (unenlarged) in an image; (None, reason) when there is none."""
    factor = max(1, max(image.size) // WORK_SIDE)
    # The box reduction averages away noise and JPEG blocks; the blur joins what it splits.
    small = np.asarray(image.reduce(factor).filter(ImageFilter.BoxBlur(1)))
    box, reason = _search_small(small, solid_search=True)
    if box is None:
        return None, reason
    scale_y, scale_x = image.height / small.shape[0], image.width / small.shape[1]
    return (
        math.floor(box[0] * scale_y),
        math.floor(box[1] * scale_x),
        min(image.height, math.ceil(box[2] * scale_y)),
        min(image.width, math.ceil(box[3] * scale_x)),
    ), ""


def _search_small(values: np.ndarray, solid_search: bool) -> tuple[Box | None, str]:
    """Finds the hand's box in a working-size uint8 array; (None, reason) when there is none."""
    background, noise = _background(values)
    found = _largest_component(values > background + max(MIN_DELTA, NOISE_SIGMAS * noise))
    if found is None:
        return None, "no hand found: nothing brighter than the background"
    area, box = found
    share = area / values.size
    if share < (MIN_MASK if solid_search else MIN_MASK_IN_FILM):
        return None, f"no hand found: the largest bright region covers {share:.1%} of the image"
    if share > MAX_MASK:
        return None, f"no hand found: {share:.0%} of the image is brighter than its background"
    top, left, bottom, right = box
    solid = area / _area(box) > SOLID_FILL
    if solid and solid_search and min(bottom - top, right - left) > _MIN_SOLID_SIDE:
        inset = _SOLID_INSET
        inner, _ = _search_small(
            values[top + inset : bottom - inset, left + inset : right - inset], solid_search=False
        )
        if inner is not None:
            return (
                inner[0] + top + inset,
                inner[1] + left + inset,
                inner[2] + top + inset,
                inner[3] + left + inset,
            ), ""
    return box, ""


def _background(values: np.ndarray) -> tuple[int, float]:
    """Returns the background level (the histogram's mode) and its pixel noise (std).

    The noise comes from differences of horizontal neighbours that both lie near the mode, not
    from the spread of the values: a film's brightness gradient (the heel effect) would count
    as noise and lift the threshold above a thumb's soft tissue.
    """
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    # Smoothed over 5 levels: JPEG and bit-depth scaling leave combs in the histogram.
    mode = int(np.argmax(np.convolve(counts, np.ones(5), mode="same")))
    signed = values.astype(np.int16)
    near = np.abs(signed - mode) <= _NOISE_WINDOW
    pairs = near[:, 1:] & near[:, :-1]
    steps = np.abs(signed[:, 1:] - signed[:, :-1])[pairs]
    # The MAD of a difference of two samples is sqrt(2) times that of one.
    noise = 1.4826 * float(np.median(steps)) / math.sqrt(2) if steps.size else 0.0
    return mode, noise


def _largest_component(mask: np.ndarray) -> tuple[int, Box] | None:
    """Returns (area, box) of the mask's largest 8-connected component; None for an empty mask."""
    rows, starts, ends, roots = _runs(mask)
    if not len(rows):
        return None
    areas = np.bincount(roots, weights=ends - starts)
    best = roots == int(np.argmax(areas))
    box = (
        int(rows[best].min()),
        int(starts[best].min()),
        int(rows[best].max()) + 1,
        int(ends[best].max()),
    )
    return int(areas.max()), box


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns the mask's horizontal runs (row, start, end exclusive) and each run's component.

    A run's component is the index of its component's first run (union-find over runs).
    """
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)  # Row-major order: runs sorted by row, then column.
    _, ends = np.nonzero(steps == -1)
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # Path halving.
            i = parent[i]
        return i

    row_list, start_list, end_list = rows.tolist(), starts.tolist(), ends.tolist()
    previous = (0, 0)  # The runs [first, last) of the row above.
    first = 0
    while first < len(row_list):
        last = first
        while last < len(row_list) and row_list[last] == row_list[first]:
            last += 1
        above_first, above_last = previous
        if above_last > above_first and row_list[above_first] == row_list[first] - 1:
            j = above_first
            for k in range(first, last):
                # 8-connected: runs touch when they overlap or meet at a corner.
                while j < above_last and end_list[j] < start_list[k]:
                    j += 1
                m = j
                while m < above_last and start_list[m] <= end_list[k]:
                    a, b = find(m), find(k)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
                    m += 1
        previous = (first, last)
        first = last
    roots = np.array([find(i) for i in range(len(row_list))], np.int64)
    return rows, starts, ends, roots
