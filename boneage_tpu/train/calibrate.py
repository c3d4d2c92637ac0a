"""What a run fits on its validation predictions after training: bias corrections, intervals.

One pass predicts every view of `--bias_correction_tta`'s mode; each TTA mode up to it is the
mean over its own views (and its spread the mean of their spreads), as evaluate computes it.
Per mode: `--fit_bias_correction` fits Deeplasia's line on that mode's predictions (TTA
averaging changes the predictions' bias, so a plain line does not fit averaged ones), and
`--fit_intervals` stores the split-conformal scores of the predictions the line gives
(`inference.intervals`). Both are saved in derived.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import schema
from boneage_tpu.inference import intervals
from boneage_tpu.inference import runner as inference
from boneage_tpu.modeling import heads

# The level of the held-out coverage check logged after fitting (any level can be asked later).
CHECK_LEVEL = 0.9


def fit(session: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fits the bias corrections and/or the interval scores the config asks for; saves them.

    Args:
      session: the training session (`train.setup.Session`: config, derived, model, strategy,
        chief); its `derived` is replaced by one holding the fits.
      log: prints one line.

    Returns:
      The DONE metrics of the fits: val_mae[_<mode>]_corrected_months, bias_slope,
      bias_intercept and tta_corrections with --fit_bias_correction; interval_check
      {mode: held-out coverage at CHECK_LEVEL per scale} with --fit_intervals.
    """
    config, val_split = session.config, session.derived.val_split
    widest = config.model.bias_correction_tta
    predictions = inference.predict_split(
        session.model,
        config.data.path,
        val_split,
        schema.read_manifest(config.data.path),
        image_size=config.data.image_size,
        batch_size=config.data.eval_batch_size or config.data.batch_size,
        tta=widest,
        strategy=session.strategy,
    )
    true = predictions.boneage
    labeled = true >= 0
    lines: dict[str, tuple[float, float]] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    result: dict[str, Any] = {}
    for mode in inference.TTA_MODES[: inference.TTA_MODES.index(widest) + 1]:
        predicted, spread = mode_predictions(predictions, widest, mode)
        label = "" if mode == "none" else f" (--tta {mode})"
        if config.model.fit_bias_correction:
            slope, intercept = heads.fit_linear_correction(true, predicted)
            lines[mode] = (slope, intercept)
            predicted = slope * predicted + intercept
            spread = None if spread is None else spread * abs(slope)
            mae = float(np.mean(np.abs(predicted - true)[labeled]))
            result[f"val_mae{'' if mode == 'none' else f'_{mode}'}_corrected_months"] = mae
            log(
                f"bias correction{label}: months = {slope:.4f} x prediction + {intercept:.2f} "
                f"(fitted on {val_split}: mae {mae:.2f} mo, in-sample)"
            )
        if config.model.fit_intervals:
            scores[mode] = intervals.fitted_scores(true, predicted, spread)
            checks = {
                scale: intervals.held_out_check(true, predicted, spread, CHECK_LEVEL, scale)
                for scale in scores[mode]
            }
            result.setdefault("interval_check", {})[mode] = checks
            log(
                f"intervals{label}: {len(scores[mode]['absolute'])} conformal scores of "
                f"{val_split}; {CHECK_LEVEL:.0%} held out (fit on half, check the other): "
                + ", ".join(
                    f"{scale} coverage {c['coverage']:.3f}, mean width {c['mean_width_months']:.1f} mo"
                    for scale, c in checks.items()
                )
            )
    derived = session.derived
    if lines:
        slope, intercept = lines.pop("none")
        derived = dataclasses.replace(
            derived, bias_slope=slope, bias_intercept=intercept, tta_corrections=lines
        )
        result.update(bias_slope=slope, bias_intercept=intercept)
        result["tta_corrections"] = {mode: list(line) for mode, line in lines.items()}
    if scores:
        derived = dataclasses.replace(derived, interval_scores=scores)
    session.derived = derived
    if session.chief:
        model_dir_lib.save_derived(config.model_dir, derived)
    return result


def mode_predictions(
    predictions: inference.SplitPredictions, widest: str, mode: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns TTA mode `mode`'s (predictions, spread) from a pass over `widest`'s views."""
    if mode == widest:
        # Averaged on the device, as evaluate's are.
        return predictions.predicted, predictions.spread
    views = inference.tta_views(widest)
    chosen = [i for i, view in enumerate(views) if view in inference.tta_views(mode)]
    predicted = np.mean(predictions.views[chosen], axis=0)
    spread = None
    if predictions.view_spreads is not None:
        spread = np.mean(predictions.view_spreads[chosen], axis=0)
    return predicted, spread
