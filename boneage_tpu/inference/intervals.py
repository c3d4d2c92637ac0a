"""Split-conformal prediction intervals: calibration scores fitted on validation, bounds applied.

A training run with --fit_intervals stores, per TTA mode, the sorted nonconformity scores of
its validation predictions (`Derived.interval_scores`): |true - predicted| ("absolute") and
|true - predicted| / spread ("spread", for heads with a per-image spread). For a level L, the
half-width is the ceil((n + 1) L)-th smallest score (times the image's spread for "spread"):
for a new image exchangeable with the calibration images, the interval holds its true age with
probability at least L (and below L + 1 / (n + 1)). Pure numpy, so it is testable anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from boneage_tpu.core import config
from boneage_tpu.core.errors import Error

SCALES = config.INTERVAL_SCALES
# Spreads below this many months are treated as this: a bins head that is sure of one bin must
# not produce a zero-width interval or a division by zero.
MIN_SPREAD_MONTHS = 0.1


class IntervalError(Error, ValueError):
    """Intervals cannot be fitted or applied as asked; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Per-image interval bounds (float64 months) at one level."""

    low: np.ndarray
    high: np.ndarray
    level: float
    scale: str

    @property
    def width(self) -> np.ndarray:
        """The interval widths in months."""
        return self.high - self.low


def scores(
    true: np.ndarray, predicted: np.ndarray, spread: np.ndarray | None, scale: str
) -> np.ndarray:
    """Returns the sorted nonconformity scores of labelled predictions.

    Args:
      true: true ages (months); rows < 0 (unlabelled) are ignored.
      predicted: the predictions the intervals will be centred on (months).
      spread: the per-image spread (months), needed for scale "spread".
      scale: absolute | spread.
    """
    true, predicted = np.asarray(true, np.float64), np.asarray(predicted, np.float64)
    labeled = true >= 0
    residual = np.abs(true - predicted)[labeled]
    if scale == "spread":
        residual = residual / _floored(_need_spread(spread))[labeled]
    elif scale != "absolute":
        raise IntervalError(f"interval scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return np.sort(residual)


def quantile(sorted_scores: Sequence[float], level: float) -> float:
    """Returns the conformal quantile: the ceil((n + 1) level)-th smallest score (inf if > n)."""
    if not 0.0 < level < 1.0:
        raise IntervalError(f"--interval must be a coverage level in (0, 1), got {level}")
    n = len(sorted_scores)
    rank = math.ceil((n + 1) * level)
    if n == 0 or rank > n:
        # Too few calibration images for this level: only the whole line covers it.
        return math.inf
    return float(sorted_scores[rank - 1])


def bounds(
    predicted: np.ndarray,
    spread: np.ndarray | None,
    sorted_scores: Sequence[float],
    level: float,
    scale: str,
) -> Bounds:
    """Returns the interval around each prediction at `level` from calibration scores."""
    predicted = np.asarray(predicted, np.float64)
    half = quantile(sorted_scores, level)
    if scale == "spread":
        half = half * _floored(_need_spread(spread))
    elif scale != "absolute":
        raise IntervalError(f"interval scale must be one of {', '.join(SCALES)}, got {scale!r}")
    half = np.broadcast_to(np.asarray(half, np.float64), predicted.shape)
    return Bounds(low=predicted - half, high=predicted + half, level=level, scale=scale)


def coverage_metrics(true: np.ndarray, interval: Bounds) -> dict[str, Any]:
    """Returns {level, scale, coverage, mean_width_months, median_width_months} on labelled rows."""
    true = np.asarray(true, np.float64)
    labeled = true >= 0
    inside = (interval.low <= true) & (true <= interval.high)
    width = interval.width
    return {
        "level": interval.level,
        "scale": interval.scale,
        "coverage": float(np.mean(inside[labeled])) if labeled.any() else None,
        "mean_width_months": float(np.mean(width)),
        "median_width_months": float(np.median(width)),
    }


def held_out_check(
    true: np.ndarray,
    predicted: np.ndarray,
    spread: np.ndarray | None,
    level: float,
    scale: str,
) -> dict[str, Any]:
    """Fits on one half of the records and measures coverage on the other, both ways round.

    The stored intervals are fitted on all of the validation split, so their coverage there is
    in-sample; this check's halves (alternate records of the split's shuffled order) are not.

    Returns:
      {level, scale, coverage (mean of the two halves), mean_width_months, n_fit, n_checked}.
    """
    true = np.asarray(true, np.float64)
    index = np.arange(len(true))
    halves = [index % 2 == 0, index % 2 == 1]
    covered, widths = [], []
    for fit, check in (halves, halves[::-1]):
        part_spread = None if spread is None else np.asarray(spread)[fit]
        fitted = scores(true[fit], np.asarray(predicted)[fit], part_spread, scale)
        check_spread = None if spread is None else np.asarray(spread)[check]
        found = coverage_metrics(
            true[check],
            bounds(np.asarray(predicted)[check], check_spread, fitted, level, scale),
        )
        covered.append(found["coverage"])
        widths.append(found["mean_width_months"])
    return {
        "level": level,
        "scale": scale,
        "coverage": float(np.mean(covered)),
        "mean_width_months": float(np.mean(widths)),
        "n_fit": int(halves[0].sum()),
        "n_checked": int(halves[1].sum()),
    }


def fitted_scores(
    true: np.ndarray, predicted: np.ndarray, spread: np.ndarray | None
) -> dict[str, list[float]]:
    """Returns {scale: sorted scores} for every scale the predictions support (rounded to 1e-4)."""
    scales = SCALES if spread is not None else ("absolute",)
    return {s: [round(float(v), 4) for v in scores(true, predicted, spread, s)] for s in scales}


def around(
    derived: config.Derived,
    tta: str,
    scale: str,
    level: float,
    predicted: np.ndarray,
    spread: np.ndarray | None,
    where: str,
) -> Bounds:
    """Returns the bounds from a run's stored scores for TTA mode `tta`.

    Args:
      derived: the run's derived values (`interval_scores`).
      tta, scale, level: the mode the predictions were made with, the score scale, the level.
      predicted, spread: the predictions (with the mode's bias correction, as fitted) and
        their spread.
      where: the model directory, named in errors.

    Raises:
      IntervalError: the run stored no scores for this mode and scale (one line).
    """
    scores = derived.intervals(tta, scale)
    if scores is None:
        fitted = "; ".join(
            f"--tta {mode}: {', '.join(by_scale)}"
            for mode, by_scale in sorted(derived.interval_scores.items())
        )
        raise IntervalError(
            f"{where} has no {scale} interval scores for --tta {tta} ("
            + (f"it has {fitted}" if fitted else "train it with --fit_intervals")
            + ")"
        )
    return bounds(predicted, spread, scores, level, scale)


def _need_spread(spread: np.ndarray | None) -> np.ndarray:
    if spread is None:
        raise IntervalError(
            "--interval_scale spread needs a head with a per-image spread (--head bins)"
        )
    return np.asarray(spread, np.float64)


def _floored(spread: np.ndarray) -> np.ndarray:
    return np.maximum(spread, MIN_SPREAD_MONTHS)
