"""Tests for boneage_tpu.data.crop: the hand box, its fallbacks, and the crop in `prepare`."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from boneage_tpu.data import crop, images
from tests.hands import film_image, hand_image

# Pixels the box may be off the exact hand: the mask is found on a copy reduced ~3x (a 400 px
# image) and blurred over 3 of its pixels.
SLACK = 8


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_box_covers_the_hand_and_not_the_marker():
    image, hand, marker = hand_image()
    found = crop.hand_box(image)
    assert found.fallback == ""
    top, left, bottom, right = found.box
    # The whole hand, faint soft tissue of the fingertips and thumb included ...
    assert top <= hand[0] and left <= hand[1] and bottom >= hand[2] and right >= hand[3]
    # ... and not much more: the marker in the corner is outside.
    assert not _overlap(found.box, marker)
    assert top >= hand[0] - 0.15 * (hand[2] - hand[0]) and bottom == image.shape[0]
    assert left >= hand[1] - 0.15 * (hand[3] - hand[1])


def test_margin_scales_the_box_about_its_centre():
    image, hand, _ = hand_image()
    tight = crop.hand_box(image, 1.0)
    assert all(abs(a - b) <= SLACK for a, b in zip(tight.box, hand, strict=True)), tight
    wide = crop.hand_box(image, 1.3)
    tight_w, wide_w = tight.right - tight.left, wide.right - wide.left
    assert wide_w == pytest.approx(1.3 * tight_w, abs=2)
    assert (wide.left + wide.right) / 2 == pytest.approx((tight.left + tight.right) / 2, abs=1)
    # Clipped to the image: the forearm reaches the bottom edge.
    assert wide.bottom == image.shape[0] and wide.top < tight.top
    huge = crop.hand_box(image, crop.MAX_MARGIN)
    assert huge.box == (0, 0, *image.shape)
    with pytest.raises(ValueError, match="margin"):
        crop.hand_box(image, 0.9)


def test_box_is_found_inside_a_film():
    image, hand, film = film_image()
    found = crop.hand_box(image)
    assert found.fallback == ""
    top, left, bottom, right = found.box
    assert top <= hand[0] and left <= hand[1] and bottom >= hand[2] and right >= hand[3]
    # The hand's box, not the film's: its top lies below the film's top.
    assert top > film[0] + 0.1 * (film[2] - film[0])


def test_numpy_and_pillow_inputs_give_the_same_box():
    image, _, _ = hand_image(300, 240, seed=1)
    assert crop.hand_box(image) == crop.hand_box(Image.fromarray(image))
    with pytest.raises(ValueError, match="uint8"):
        crop.hand_box(image.astype(np.float32))
    with pytest.raises(ValueError, match="mode-L"):
        crop.hand_box(Image.fromarray(image).convert("RGB"))


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("blank", lambda: np.zeros((200, 160), np.uint8), "no hand found"),
        ("white", lambda: np.full((200, 160), 255, np.uint8), "no hand found"),
        (
            "noise",
            lambda: np.random.default_rng(0).integers(0, 256, (200, 160)).astype(np.uint8),
            "no hand found",
        ),
        ("one dot", lambda: np.pad(np.full((1, 1), 255, np.uint8), 100), "no hand found"),
        ("inverted", lambda: hand_image(inverted=True)[0], "no hand found"),
        ("tiny", lambda: np.zeros((10, 300), np.uint8), "too small"),
        ("one pixel", lambda: np.zeros((1, 1), np.uint8), "too small"),
    ],
)
def test_implausible_masks_fall_back_to_the_whole_image(name, make, reason):
    image = make()
    found = crop.hand_box(image)
    assert found.box == (0, 0, *image.shape), name
    assert reason in found.fallback, (name, found.fallback)


def test_crop_image_applies_the_box_or_reports_the_fallback():
    image, _, _ = hand_image()
    pil = Image.fromarray(image)
    box = crop.hand_box(image)
    cropped, reason = crop.crop_image(pil, "hand", crop.DEFAULT_MARGIN)
    assert reason == ""
    np.testing.assert_array_equal(
        np.asarray(cropped), image[box.top : box.bottom, box.left : box.right]
    )
    assert crop.crop_image(pil, "none", 1.15) == (pil, "")
    whole, reason = crop.crop_image(Image.fromarray(255 - image), "hand", 1.15)
    assert whole.size == pil.size and "no hand found" in reason
    with pytest.raises(ValueError, match="crop must be one of"):
        crop.crop_image(pil, "box", 1.15)


def test_scale_box_clips_to_the_image():
    assert crop.scale_box((10, 10, 20, 30), 1.0, 100, 100) == (10, 10, 20, 30)
    assert crop.scale_box((10, 10, 20, 30), 2.0, 100, 100) == (5, 0, 25, 40)
    assert crop.scale_box((0, 0, 100, 100), 1.5, 100, 100) == (0, 0, 100, 100)


def test_components_are_8_connected():
    mask = np.array(
        [
            [1, 0, 0, 1, 0, 1],
            [0, 1, 0, 1, 0, 1],
            [0, 0, 0, 1, 1, 1],  # A U: two runs of row 0 joined two rows later.
            [1, 1, 0, 0, 0, 0],
        ],
        bool,
    )
    labels, count = crop.label_components(mask)
    assert count == 3
    assert labels[0, 0] == labels[1, 1] != 0  # Diagonal neighbours.
    assert labels[0, 3] == labels[0, 5] == labels[2, 4]
    assert labels[3, 0] == labels[3, 1] not in (labels[0, 0], labels[0, 3])
    assert (labels == 0).sum() == (~mask).sum()
    assert crop.label_components(np.zeros((3, 4), bool))[1] == 0


def test_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.6):
        mask = rng.random((70, 90)) < density
        labels, count = crop.label_components(mask)
        expected, expected_count = ndimage.label(mask, structure=np.ones((3, 3)))
        assert count == expected_count
        # The same partition: every label pairs with exactly one of scipy's.
        pairs = set(zip(labels[mask].tolist(), expected[mask].tolist(), strict=True))
        assert len(pairs) == count


def test_prepare_crops_before_resizing():
    image, _, _ = hand_image()
    data = _png(image)
    box = crop.hand_box(image)
    fallbacks = []
    encoded, height, width = images.prepare(
        data, "h.png", 64, "png", crop="hand", on_crop_fallback=fallbacks.append
    )
    expected = images.resize_longest_side(image[box.top : box.bottom, box.left : box.right], 64)
    assert fallbacks == [] and (height, width) == expected.shape
    np.testing.assert_array_equal(images.decode(encoded, "png", height, width), expected)
    # Uncropped, the same image is stored with the marker and more background.
    plain, plain_height, plain_width = images.prepare(data, "h.png", 64, "png")
    assert (plain_height, plain_width) != (height, width)
    assert plain == images.encode(images.resize_longest_side(image, 64), "png")


def test_prepare_reports_a_fallback_and_keeps_the_whole_image():
    image = hand_image(inverted=True)[0]  # Plausible as a radiograph; no bright hand.
    data = _png(image)
    fallbacks = []
    cropped = images.prepare(
        data, "i.png", 64, "png", crop="hand", on_crop_fallback=fallbacks.append
    )
    assert len(fallbacks) == 1 and "no hand found" in fallbacks[0]
    assert cropped == images.prepare(data, "i.png", 64, "png")
    never = []
    images.prepare(_png(hand_image()[0]), "h.png", 64, "png", on_crop_fallback=never.append)
    assert never == []  # crop none: nothing to report


def test_crop_settings_match_the_schema_bounds():
    assert crop.CROPS == ("none", "hand")
    assert (crop.MIN_MARGIN, crop.MAX_MARGIN) == (1.0, 4.0)
    assert crop.MIN_MARGIN <= crop.DEFAULT_MARGIN <= crop.MAX_MARGIN
