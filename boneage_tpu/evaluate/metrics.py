"""Bone-age evaluation metrics in plain numpy (MAE, RMSE, bias, R², MAE by sex and age band).

Everything is computed in float64 from the exact values written to predictions.csv, so a reader
recomputing the metrics from that file with numpy gets the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from boneage_tpu.core import schema


def _mean_or_none(values: np.ndarray) -> float | None:
    """Returns the mean as a float, or None for an empty array (JSON has no NaN)."""
    return float(np.mean(values)) if values.size else None


def regression_metrics(
    true: Sequence[float] | np.ndarray,
    predicted: Sequence[float] | np.ndarray,
    male: Sequence[float] | np.ndarray,
    *,
    train_mean_months: float,
) -> dict[str, Any]:
    """Computes the evaluation metrics over labeled records.

    Args:
      true: bone age labels in months; negative values (schema.NO_LABEL) mark unlabeled records,
        which are counted in `n` but left out of every error metric.
      predicted: predictions in months, same length.
      male: 1 for male, 0 for female, same length.
      train_mean_months: the training-split mean label (manifest `label_stats.mean_months`),
        used for the naive baseline `mean_predictor_mae_months`.

    Returns:
      A JSON-ready dict: n, n_labeled, mae_months, mean_predictor_mae_months, rmse_months,
      bias (months, mean of predicted - true), r2, mae_by_sex {male, female},
      mae_by_age_band {band name: MAE} and count_by_sex / count_by_age_band. Metrics over an
      empty group are None.
    """
    true = np.asarray(true, np.float64)
    predicted = np.asarray(predicted, np.float64)
    male = np.asarray(male, np.float64)
    if not true.shape == predicted.shape == male.shape or true.ndim != 1:
        raise ValueError(
            f"true, predicted and male must be 1-D and equally long, got shapes "
            f"{true.shape}, {predicted.shape}, {male.shape}"
        )
    if not np.all(np.isfinite(predicted)):
        bad = int(np.sum(~np.isfinite(predicted)))
        raise ValueError(f"{bad} of {predicted.size} predictions are not finite (NaN or inf)")
    labeled = true >= 0
    y, p, m = true[labeled], predicted[labeled], male[labeled] > 0.5
    error = p - y
    abs_error = np.abs(error)
    ss_tot = float(np.sum((y - y.mean()) ** 2)) if y.size else 0.0
    r2 = 1.0 - float(np.sum(error**2)) / ss_tot if ss_tot > 0 else None
    bands = np.array([schema.age_band(v) for v in y], np.int64)
    mae = _mean_or_none(abs_error)
    return {
        "n": int(true.size),
        "n_labeled": int(y.size),
        "mae_months": mae,
        "mean_predictor_mae_months": _mean_or_none(np.abs(y - float(train_mean_months))),
        "train_mean_months": float(train_mean_months),
        "rmse_months": math.sqrt(float(np.mean(error**2))) if y.size else None,
        "bias": _mean_or_none(error),
        "r2": r2,
        "mae_by_sex": {"male": _mean_or_none(abs_error[m]), "female": _mean_or_none(abs_error[~m])},
        "count_by_sex": {"male": int(m.sum()), "female": int((~m).sum())},
        "mae_by_age_band": {
            name: _mean_or_none(abs_error[bands == i])
            for i, name in enumerate(schema.AGE_BAND_NAMES)
        },
        "count_by_age_band": {
            name: int(np.sum(bands == i)) for i, name in enumerate(schema.AGE_BAND_NAMES)
        },
        "mae_by_age_band_and_sex": {
            sex: {
                name: _mean_or_none(abs_error[(bands == i) & (m == is_male)])
                for i, name in enumerate(schema.AGE_BAND_NAMES)
            }
            for sex, is_male in (("male", True), ("female", False))
        },
    }
