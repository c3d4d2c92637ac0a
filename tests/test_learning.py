"""Regression guard: a brief quickstart-style run learns phantom anatomy (not the mean)."""

from __future__ import annotations

import pytest

from boneage_tpu.quickstart import job as quickstart


@pytest.mark.slow
def test_tiny_model_beats_the_mean_predictor(tmp_path) -> None:
    config = quickstart.QuickstartConfig(
        output=str(tmp_path / "run"),
        num_images=400,
        phantom_width=192,
        phantom_height=240,
        data_image_size=96,
        image_size=96,
        train_steps=600,
        seed=1,
    )
    metrics = quickstart.run(config)
    assert metrics["n"] == 80  # val_fraction 0.2 of 400
    # Broken learning (a constant output) lands near 1.0; this run gives ~0.37 here.
    assert metrics["mae_months"] < 0.6 * metrics["mean_predictor_mae_months"], metrics
