"""Writes an evaluation's outputs: metrics.json, predictions.csv, report.png and report.html.

All writes go through `tf.io.gfile`, so the output folder may be local or gs://. The figure is
drawn with matplotlib's object API on an Agg canvas (no pyplot global state), at a fixed size.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from boneage_tpu.core import guard, schema
from boneage_tpu.core.config import join

METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"
REPORT_PNG_NAME = "report.png"
REPORT_HTML_NAME = "report.html"
PREDICTION_COLUMNS = ("id", "male", "boneage", "predicted", "error")
SPREAD_COLUMN = "spread_months"  # the bins head's per-image std, when it has one
INTERVAL_COLUMNS = ("low_months", "high_months")  # with --interval: the conformal bounds
# report.png is exactly FIGURE_INCHES * DPI pixels (width, height): no tight bbox cropping.
FIGURE_INCHES = (15.0, 5.0)
DPI = 100
REPORT_PNG_SIZE = (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))


def _write(path: str, data: str | bytes) -> None:
    mode = "wb" if isinstance(data, bytes) else "w"
    with tf.io.gfile.GFile(path, mode) as f:
        f.write(data)


def predictions_csv(
    ids: Sequence[str],
    male: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    spread: np.ndarray | None = None,
    interval: tuple[np.ndarray, np.ndarray] | None = None,
) -> str:
    """Returns predictions.csv text; unlabeled records get empty boneage and error cells.

    An id starting like a spreadsheet formula (`=`, `+`, `-`, `@`, tab, CR) is written with a
    leading `'` (`guard.csv_cell`); numbers are written as numbers. Floats are written with
    Python's shortest round-trip repr, so parsing the file gives back
    exactly the values the metrics were computed from. With `spread` (the bins head's
    per-image std in months, an uncertainty) a `spread_months` column is added; with
    `interval` ((low, high) months, `evaluate --interval`) `low_months` and `high_months`.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            *PREDICTION_COLUMNS,
            *([SPREAD_COLUMN] if spread is not None else []),
            *(INTERVAL_COLUMNS if interval is not None else ()),
        ]
    )
    spreads = spread if spread is not None else [None] * len(ids)
    bounds = zip(*interval, strict=True) if interval is not None else [None] * len(ids)
    for image_id, m, y, p, s, b in zip(ids, male, true, predicted, spreads, bounds, strict=True):
        labeled = y >= 0
        row = [
            guard.csv_cell(guard.printable(image_id)),  # No spreadsheet formula (guard).
            int(m > 0.5),
            repr(float(y)) if labeled else "",
            repr(float(p)),
            repr(float(p) - float(y)) if labeled else "",
        ]
        row += [] if s is None else [repr(float(s))]
        writer.writerow(row if b is None else [*row, repr(float(b[0])), repr(float(b[1]))])
    return buf.getvalue()


def render_png(
    metrics: Mapping[str, Any], male: np.ndarray, true: np.ndarray, predicted: np.ndarray
) -> bytes:
    """Draws predicted-vs-true, Bland–Altman and MAE-by-age-band panels; returns PNG bytes."""
    fig = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    ax_scatter, ax_ba, ax_bands = fig.subplots(1, 3)
    labeled = true >= 0
    y, p, m = true[labeled], predicted[labeled], male[labeled] > 0.5
    sexes = (("male", m, "tab:blue"), ("female", ~m, "tab:red"))

    low = min(0.0, float(np.min(p, initial=0.0)))
    top = max(schema.MAX_AGE_MONTHS, float(np.max(p, initial=0.0)))
    ax_scatter.plot([low, top], [low, top], color="black", lw=1, label="identity")
    for name, sel, color in sexes:
        ax_scatter.scatter(y[sel], p[sel], s=8, alpha=0.6, color=color, label=name)
    mae = metrics.get("mae_months")
    mae_text = "n/a" if mae is None else f"{mae:.2f}"
    ax_scatter.set(
        xlabel="true bone age (months)",
        ylabel="predicted (months)",
        title=f"Predicted vs true (n={y.size}, MAE {mae_text} mo)",
        xlim=(low, top),
        ylim=(low, top),
    )
    ax_scatter.set_aspect("equal")
    ax_scatter.legend(loc="upper left", fontsize=8)

    mean, diff = (p + y) / 2.0, p - y
    for name, sel, color in sexes:
        ax_ba.scatter(mean[sel], diff[sel], s=8, alpha=0.6, color=color, label=name)
    if diff.size:
        bias, sd = float(diff.mean()), float(diff.std())
        ax_ba.axhline(bias, color="black", lw=1, label=f"bias {bias:+.2f}")
        for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
            ax_ba.axhline(limit, color="gray", lw=1, ls="--")
    ax_ba.set(
        xlabel="mean of predicted and true (months)",
        ylabel="predicted - true (months)",
        title="Bland-Altman (bias, ±1.96 SD)",
    )
    ax_ba.legend(loc="upper left", fontsize=8)

    x = np.arange(schema.NUM_AGE_BANDS)
    by_band = metrics.get("mae_by_age_band_and_sex", {})
    for offset, (name, _, color) in zip((-0.2, 0.2), sexes, strict=True):
        values = [by_band.get(name, {}).get(b) for b in schema.AGE_BAND_NAMES]
        heights = [np.nan if v is None else v for v in values]
        ax_bands.bar(x + offset, heights, width=0.4, color=color, label=name)
    if mae is not None:
        ax_bands.axhline(mae, color="black", lw=1, label=f"overall {mae:.2f}")
    naive = metrics.get("mean_predictor_mae_months")
    if naive is not None:
        ax_bands.axhline(naive, color="gray", lw=1, ls="--", label=f"mean predictor {naive:.2f}")
    ax_bands.set_xticks(x, schema.AGE_BAND_NAMES)
    ax_bands.set(xlabel="true age band", ylabel="MAE (months)", title="MAE by age band and sex")
    ax_bands.legend(loc="upper left", fontsize=8)

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _rows(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Flattens nested metric dicts into (dotted name, formatted value) rows."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_rows(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            rows.append((name, ", ".join(_fmt(v) for v in value)))
        else:
            rows.append((name, _fmt(value)))
    return rows


def render_html(metrics: Mapping[str, Any], png: bytes, title: str, extra_html: str = "") -> str:
    """Returns a self-contained HTML page: the figure (embedded), `extra_html` and the metrics.

    `extra_html` is e.g. the case gallery of `boneage_tpu.evaluate.gallery`.
    """
    table = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _rows(metrics)
    )
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left}} img{{max-width:100%}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<img alt="predicted vs true, Bland-Altman and MAE by age band" src="data:image/png;base64,{image}">
{extra_html}
<h2>Metrics</h2>
<table>
{table}
</table>
<p>Per-image results: <a href="{PREDICTIONS_NAME}">{PREDICTIONS_NAME}</a>,
metrics as JSON: <a href="{METRICS_NAME}">{METRICS_NAME}</a>.</p>
</body></html>
"""


def write_outputs(
    output_dir: str,
    metrics: Mapping[str, Any],
    ids: Sequence[str],
    male: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    *,
    title: str = "Bone age evaluation",
    spread: np.ndarray | None = None,
    interval: tuple[np.ndarray, np.ndarray] | None = None,
    extra_html: str = "",
) -> dict[str, str]:
    """Writes predictions.csv, report.png, report.html and (last) metrics.json.

    metrics.json is written last because its presence marks the evaluation complete (the
    continuous evaluator skips steps that have it). `extra_html` goes into report.html after
    the figure (the case gallery of `boneage_tpu.evaluate.gallery`).

    Returns:
      Output name -> full path.
    """
    tf.io.gfile.makedirs(output_dir)
    paths = {
        name: join(output_dir, name)
        for name in (PREDICTIONS_NAME, REPORT_PNG_NAME, REPORT_HTML_NAME, METRICS_NAME)
    }
    _write(paths[PREDICTIONS_NAME], predictions_csv(ids, male, true, predicted, spread, interval))
    png = render_png(metrics, male, true, predicted)
    _write(paths[REPORT_PNG_NAME], png)
    _write(paths[REPORT_HTML_NAME], render_html(metrics, png, title, extra_html))
    _write(paths[METRICS_NAME], json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return paths
