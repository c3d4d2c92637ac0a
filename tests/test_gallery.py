"""Tests for boneage_tpu.evaluate.gallery's case choice and HTML (the heatmap pass is in test_evaluate)."""

from __future__ import annotations

import numpy as np

from boneage_tpu.evaluate import gallery


def test_select_cases_orders_worst_and_best_and_skips_unlabeled():
    true = np.array([10.0, -1.0, 30.0, 40.0, 50.0, 60.0])
    predicted = np.array([11.0, 500.0, 45.0, 40.5, 20.0, 62.0])  # |errors| 1, -, 15, .5, 30, 2
    worst, best = gallery.select_cases(true, predicted, 2)
    assert worst == [4, 2] and best == [3, 0]
    worst, best = gallery.select_cases(true, predicted, 4)  # fewer than 2k labeled rows
    assert worst == [4, 2, 5, 0] and best == [3]
    assert gallery.select_cases(np.full(3, -1.0), np.zeros(3), 8) == ([], [])


def _summary(**changes):
    summary = gallery.shortcut_summary({"a": 0.25, "b": 0.75, "c": float("nan")},
                                       {"a": 0.5, "b": 0.7, "c": 0.6}, "grad-cam", "runs/m")  # fmt: skip
    return {**summary, **changes}


def test_shortcut_summary_averages_finite_maps_against_the_uniform_baseline():
    summary = _summary()
    assert summary["outside_hand_mass_fraction"] == 0.5
    assert summary["n"] == 2 and summary["n_all_zero_maps"] == 1
    assert summary["uniform_map_outside_fraction"] == (0.5 + 0.7 + 0.6) / 3


def test_section_escapes_ids_and_says_when_there_is_no_gallery():
    case = gallery.Case("<x&y>", 1.0, 100.0, 112.5, 0.2, b"\x89PNG")
    page = gallery.render_section([case], [], _summary())
    assert "&lt;x&amp;y&gt;" in page and "<x&y>" not in page
    assert "error +12.5 months" in page and "1 worst cases" in page and "50.0 %" in page
    assert "No case gallery" in gallery.render_section([], [], _summary())
    assert "predicted 112.5 · error" in page  # a regression model has no spread
    bins = gallery.Case("b", 0.0, 100.0, 90.0, 0.2, b"\x89PNG", spread=7.3)
    assert "predicted 90.0 ± 7.3 · error -10.0 months" in gallery.render_section(
        [bins], [], _summary()
    )
