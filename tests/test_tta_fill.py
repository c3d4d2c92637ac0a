"""Tests for the rotated TTA views' fill: black or the film's own background."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from boneage_tpu.inference import runner as inference


def _film(background: float = 90.0, size: int = 32) -> tf.Tensor:
    """A grey film with a bright 'hand' in the middle, [1, S, S, 1] float32."""
    image = np.full((1, size, size, 1), background, np.float32)
    image[0, 8:24, 10:22, 0] = 200.0
    return tf.constant(image)


def test_background_fill_reads_the_films_border_median_in_the_corners() -> None:
    film = _film()
    black = inference.view_images(film, 10.0, False, "black").numpy()
    grey = inference.view_images(film, 10.0, False, "background").numpy()
    assert black[0, 0, 0, 0] == pytest.approx(0.0, abs=1e-3)
    assert grey[0, 0, 0, 0] == pytest.approx(90.0, abs=1e-3)
    # Inside the film both are the same bilinear samples.
    np.testing.assert_allclose(grey[0, 12:20, 12:20], black[0, 12:20, 12:20], atol=1e-3)
    assert float(inference.border_median(film)[0, 0, 0, 0]) == 90.0


def test_unrotated_views_are_exact_with_either_fill() -> None:
    film = _film()
    for fill in inference.TTA_FILLS:
        np.testing.assert_array_equal(inference.view_images(film, 0.0, False, fill), film)
        np.testing.assert_array_equal(
            inference.view_images(film, 0.0, True, fill), tf.reverse(film, axis=[2])
        )


def test_an_unknown_fill_is_one_line() -> None:
    with pytest.raises(inference.InferenceError, match="--tta_fill must be one of"):
        inference.view_images(_film(), 5.0, False, "white")
