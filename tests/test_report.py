"""Tests for boneage_tpu.report: the four output files and their agreement with each other."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage_tpu.evaluate import metrics, report
from tests.helpers import recompute_from_csv


def _toy_results(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    true = rng.uniform(1, 228, n)
    predicted = true + rng.normal(0, 12, n)
    male = (rng.random(n) < 0.5).astype(np.float64)
    true[:3] = -1.0  # a few unlabeled records
    ids = [f"img{i:03d}" for i in range(n)]
    return ids, male, true, predicted


def test_outputs_agree_with_numpy_on_csv(tmp_path):
    ids, male, true, predicted = _toy_results()
    values = metrics.regression_metrics(true, predicted, male, train_mean_months=110.0)
    paths = report.write_outputs(str(tmp_path), values, ids, male, true, predicted)
    assert set(paths) == {"metrics.json", "predictions.csv", "report.png", "report.html"}
    written = json.loads((tmp_path / "metrics.json").read_text())
    ref = recompute_from_csv(tmp_path / "predictions.csv", 110.0)
    assert written["n"] == ref["n"] == len(ids)
    for key in ("mae_months", "rmse_months", "bias", "r2", "mean_predictor_mae_months"):
        assert written[key] == pytest.approx(ref[key], abs=1e-6), key
    assert written["mae_by_sex"]["male"] == pytest.approx(ref["mae_male"], abs=1e-6)
    assert written["mae_by_sex"]["female"] == pytest.approx(ref["mae_female"], abs=1e-6)
    assert ref["error_column_max_diff"] < 1e-9
    df = pd.read_csv(tmp_path / "predictions.csv", dtype={"id": str})
    assert list(df.columns) == list(report.PREDICTION_COLUMNS)
    assert df["id"].tolist() == ids
    assert df["boneage"].isna().sum() == 3 and df["error"].isna().sum() == 3


def test_png_has_expected_size_and_content(tmp_path):
    ids, male, true, predicted = _toy_results()
    values = metrics.regression_metrics(true, predicted, male, train_mean_months=110.0)
    report.write_outputs(str(tmp_path), values, ids, male, true, predicted)
    with Image.open(tmp_path / "report.png") as image:
        assert image.format == "PNG"
        assert image.size == report.REPORT_PNG_SIZE == (1500, 500)
        pixels = np.asarray(image.convert("L"), np.float64)
    # Not blank: axes, points and text give many distinct grey levels.
    assert pixels.std() > 5
    assert len(np.unique(pixels)) > 20
    # The scatter panel has blue (male) and red (female) markers.
    rgb = np.asarray(Image.open(tmp_path / "report.png").convert("RGB"), np.int32)
    blue = (rgb[..., 2] - rgb[..., 0] > 60).sum()
    red = (rgb[..., 0] - rgb[..., 2] > 60).sum()
    assert blue > 50 and red > 50


def test_html_embeds_png_and_shows_metrics(tmp_path):
    ids, male, true, predicted = _toy_results()
    values = metrics.regression_metrics(true, predicted, male, train_mean_months=110.0)
    report.write_outputs(str(tmp_path), values, ids, male, true, predicted, title="Run <7>")
    page = (tmp_path / "report.html").read_text()
    assert "Run &lt;7&gt;" in page  # escaped title
    for key in ("mae_months", "mean_predictor_mae_months", "rmse_months", "bias", "r2"):
        assert f"<th>{key}</th><td>{values[key]:.4f}</td>" in page
    assert "<th>mae_by_age_band.16-19y</th>" in page
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(embedded) == (tmp_path / "report.png").read_bytes()


def test_report_renders_without_labels(tmp_path):
    ids = ["a", "b"]
    male, true, predicted = np.array([1.0, 0.0]), np.array([-1.0, -1.0]), np.array([50.0, 70.0])
    values = metrics.regression_metrics(true, predicted, male, train_mean_months=100.0)
    report.write_outputs(str(tmp_path), values, ids, male, true, predicted)
    assert "<th>mae_months</th><td>n/a</td>" in (tmp_path / "report.html").read_text()
    with Image.open(io.BytesIO((tmp_path / "report.png").read_bytes())) as image:
        assert image.size == report.REPORT_PNG_SIZE
    assert json.loads((tmp_path / "metrics.json").read_text())["mae_months"] is None
