"""The fits an evaluation applies: which bias correction, in-sample checks, per-view MAEs, intervals.

A training run fits one linear correction per TTA mode (`Derived.correction`); the model holds
the plain predictions' line itself. Evaluation undoes that line to get each member's own
predictions, applies the line fitted for its --tta mode (or none), and reports both MAEs, whether
the line was fitted on the evaluated records, and each TTA view's own MAE. With --interval, the
run's conformal scores for the mode give each prediction its interval (`interval_metrics`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from boneage_tpu.core import config as config_lib
from boneage_tpu.core.errors import UsageError
from boneage_tpu.inference import intervals, restore
from boneage_tpu.inference import runner as inference


def uncorrected(
    result: inference.SplitPredictions, line: tuple[float, float]
) -> inference.SplitPredictions:
    """Returns the network's own predictions (views and spread too), undoing `line`."""
    if tuple(line) == (1.0, 0.0):
        return result
    slope, intercept = line
    return dataclasses.replace(
        result,
        predicted=(result.predicted - intercept) / slope,
        spread=None if result.spread is None else result.spread / abs(slope),
        views=None if result.views is None else (result.views - intercept) / slope,
        view_spreads=None if result.view_spreads is None else result.view_spreads / abs(slope),
    )


def corrected(
    result: inference.SplitPredictions, line: tuple[float, float] | None
) -> inference.SplitPredictions:
    """Returns the predictions with `line` applied to the TTA mean; the views stay uncorrected.

    The line was fitted to the mean of the mode's views, not to any single view.
    """
    if line is None:
        return result
    slope, intercept = line
    return dataclasses.replace(
        result,
        predicted=slope * result.predicted + intercept,
        spread=None if result.spread is None else result.spread * abs(slope),
    )


def correction_metrics(
    applied: inference.SplitPredictions,
    raw: inference.SplitPredictions,
    lines: Sequence[tuple[float, float] | None],
) -> dict[str, Any]:
    """Returns the applied bias correction and the MAE with and without it.

    Args:
      applied: the predictions with the members' corrections applied (as evaluated).
      raw: the same records' uncorrected predictions (the network's own).
      lines: each member's applied (slope, intercept), None for a member that applied none.

    Returns:
      bias_correction ({slope, intercept}; an ensemble's members' mean line; None when none
      was applied), mae_corrected_months (None when none was applied) and
      mae_uncorrected_months (None without labels).
    """
    labeled = raw.boneage >= 0

    def mae(predicted: np.ndarray) -> float | None:
        return float(np.mean(np.abs(predicted - raw.boneage)[labeled])) if labeled.any() else None

    fitted = [line for line in lines if line is not None]
    if not fitted:
        return {
            "bias_correction": None,
            "mae_corrected_months": None,
            "mae_uncorrected_months": mae(raw.predicted),
        }
    return {
        "bias_correction": {
            "slope": float(np.mean([line[0] for line in fitted])),
            "intercept": float(np.mean([line[1] for line in fitted])),
        },
        "mae_corrected_months": mae(applied.predicted),
        "mae_uncorrected_months": mae(raw.predicted),
    }


def correction_status(
    correction: str, tta: str, derived: Sequence[config_lib.Derived]
) -> tuple[str, str]:
    """Returns the bias correction's (status, note) for `--correction` and `--tta`.

    The status is applied | off | not_fitted_for_tta | not_fitted; the note ("" when the correction is applied to every member) is one line for the console.
    """
    if correction == "none":
        return "off", "--correction none: the network's own predictions, no bias correction"
    lines = [d.correction(tta) for d in derived]
    fitted = sorted({m for d in derived for m in d.fitted_modes()})
    if all(line is not None for line in lines):
        return "applied", ""
    missing = f"no bias correction fitted for --tta {tta}"
    if any(line is not None for line in lines):
        return "applied", f"{missing} in some ensemble members: those apply none"
    if fitted:
        return (
            "not_fitted_for_tta",
            f"{missing} (fitted for: {', '.join(fitted)}): none applied",
        )
    return "not_fitted", ""


def same_folder(a: str, b: str) -> bool:
    """Whether two data paths name the same folder (local paths resolved, gs:// as written)."""

    def normal(path: str) -> str:
        if "://" in path:
            return path.rstrip("/")
        return os.path.normcase(os.path.realpath(os.path.expanduser(path)))

    return bool(a) and bool(b) and normal(a) == normal(b)


def fit_split_matches(loaded: restore.LoadedModel, data: str, split: str) -> bool:
    """Whether `split` of the data folder `data` is the one the run fits on after training."""
    fit_split = loaded.derived.val_split or loaded.config.data.val_split
    return fit_split == split and same_folder(loaded.config.data.path, data)


def fitted_in_sample(loaded: restore.LoadedModel, data: str, split: str) -> bool:
    """Whether the run fitted a bias correction on `split` of the data folder `data`."""
    return bool(loaded.derived.fitted_modes()) and fit_split_matches(loaded, data, split)


def view_metrics(raw: inference.SplitPredictions, tta: str) -> list[dict[str, Any]]:
    """Returns each TTA view's own MAE, uncorrected: [{angle, flip, mae_months}]."""
    labeled = raw.boneage >= 0
    return [
        {
            "angle": angle,
            "flip": flip,
            "mae_months": float(np.mean(np.abs(raw.views[i] - raw.boneage)[labeled]))
            if labeled.any()
            else None,
        }
        for i, (angle, flip) in enumerate(inference.tta_views(tta))
    ]


def interval_metrics(
    level: float,
    scale: str,
    tta: str,
    result: inference.SplitPredictions,
    loaded: restore.LoadedModel,
    line: tuple[float, float] | None,
    in_sample: bool,
) -> tuple[intervals.Bounds, dict[str, Any]]:
    """Returns the conformal bounds around the evaluated predictions and metrics.json's interval.

    Args:
      level, scale: --interval and --interval_scale.
      tta: the evaluated TTA mode, whose stored scores apply.
      result: the evaluated predictions (with the mode's correction when `line`).
      loaded: the (single) evaluated run.
      line: the applied bias correction, None for none.
      in_sample: whether the evaluated split is the one the scores were fitted on.

    Raises:
      UsageError: --correction none on a run whose scores are around corrected predictions.
      intervals.IntervalError: the run stored no scores for the mode and scale.
    """
    if line is None and loaded.derived.correction(tta) is not None:
        raise UsageError(
            f"the intervals of {loaded.model_dir} were fitted around its bias-corrected "
            "predictions: drop --correction none to use --interval"
        )
    bounds = intervals.around(
        loaded.derived, tta, scale, level, result.predicted, result.spread, loaded.model_dir
    )
    values = {
        **intervals.coverage_metrics(result.boneage, bounds),
        "n_calibration": len(loaded.derived.intervals(tta, scale)),
        "in_sample": in_sample,
        "centred_on": "corrected" if line is not None else "uncorrected",
    }
    covered = values["coverage"]
    print(
        f"{level:.0%} intervals ({scale}): mean width {values['mean_width_months']:.1f} months"
        + ("" if covered is None else f", coverage {covered:.3f}")
        + (" (in-sample: fitted on these records)" if in_sample else "")
    )
    return bounds, values
