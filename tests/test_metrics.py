"""Tests for boneage_tpu.metrics: values checked against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from boneage_tpu.core import schema
from boneage_tpu.evaluate import metrics


def test_hand_computed_values():
    true = [10.0, 30.0, 100.0, 200.0]
    predicted = [12.0, 26.0, 100.0, 210.0]  # errors +2, -4, 0, +10
    male = [1, 0, 1, 0]
    m = metrics.regression_metrics(true, predicted, male, train_mean_months=100.0)
    assert m["n"] == m["n_labeled"] == 4
    assert m["mae_months"] == pytest.approx(4.0)
    assert m["bias"] == pytest.approx(2.0)
    assert m["rmse_months"] == pytest.approx(math.sqrt((4 + 16 + 0 + 100) / 4))
    ss_tot = sum((t - 85.0) ** 2 for t in true)
    assert m["r2"] == pytest.approx(1 - 120 / ss_tot)
    assert m["mean_predictor_mae_months"] == pytest.approx((90 + 70 + 0 + 100) / 4)
    assert m["mae_by_sex"] == pytest.approx({"male": 1.0, "female": 7.0})
    assert m["count_by_sex"] == {"male": 2, "female": 2}
    # 10 -> 0-2y, 30 -> 2-6y, 100 -> 6-10y, 200 -> 16-19y.
    assert m["mae_by_age_band"] == {
        "0-2y": pytest.approx(2.0),
        "2-6y": pytest.approx(4.0),
        "6-10y": pytest.approx(0.0),
        "10-13y": None,
        "13-16y": None,
        "16-19y": pytest.approx(10.0),
    }
    assert m["mae_by_age_band_and_sex"]["female"]["16-19y"] == pytest.approx(10.0)
    assert m["mae_by_age_band_and_sex"]["male"]["16-19y"] is None


def test_band_edges_follow_schema():
    edges = schema.AGE_BAND_EDGES_MONTHS[1:-1]
    m = metrics.regression_metrics(list(edges), list(edges), [1] * len(edges), train_mean_months=0)
    # A value on an edge belongs to the band that starts there.
    assert list(m["count_by_age_band"].values()) == [0, 1, 1, 1, 1, 1]


def test_unlabeled_records_count_in_n_only():
    m = metrics.regression_metrics(
        [schema.NO_LABEL, 50.0], [80.0, 55.0], [0, 0], train_mean_months=60.0
    )
    assert (m["n"], m["n_labeled"]) == (2, 1)
    assert m["mae_months"] == pytest.approx(5.0)
    assert m["r2"] is None  # one label: no variance to explain
    assert m["mae_by_sex"]["male"] is None


def test_all_unlabeled_gives_none_metrics():
    m = metrics.regression_metrics([-1.0, -1.0], [3.0, 4.0], [1, 0], train_mean_months=60.0)
    assert m["n"] == 2 and m["n_labeled"] == 0
    assert m["mae_months"] is None and m["rmse_months"] is None and m["bias"] is None


def test_rejects_non_finite_and_mismatched_inputs():
    with pytest.raises(ValueError, match="not finite"):
        metrics.regression_metrics([1.0, 2.0], [np.nan, 2.0], [1, 1], train_mean_months=0)
    with pytest.raises(ValueError, match="equally long"):
        metrics.regression_metrics([1.0, 2.0], [1.0], [1, 1], train_mean_months=0)
