"""Tests of tools.benchmark_input: input checks, the summary maths, and one tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import requires_tf_keras
from tools import benchmark_input

REQUIRED_KEYS = {
    "seed_img_s",
    "host_img_s",
    "full_img_s",
    "floor_img_s_per_core",
    "cores",
    "host_vs_seed",
    "full_vs_seed",
    "host_vs_floor",
    "peak_rss_mb",
}


def _write_sample(folder, ids=("1", "2", "3")) -> tuple[str, str]:
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id in ids:
        # A gradient under the noise: pure noise is refused by the converter's plausibility check.
        gradient = np.add.outer(np.arange(104), np.arange(80)) * 1.2
        pixels = np.clip(gradient + rng.integers(0, 60, (104, 80)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(images / f"{image_id}.png")
    labels = folder / "labels.csv"
    labels.write_text("id,boneage,male\n1,30,True\n2,150,False\n3,200,True\n")
    return str(labels), str(images)


def test_missing_images_and_columns_are_one_line_errors(tmp_path):
    labels, images = _write_sample(tmp_path, ids=("1", "2"))
    with pytest.raises(benchmark_input.BenchError, match=r"1 images of .* not in .*\['3'\]"):
        benchmark_input.read_labels(labels, images)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,age\n1,3\n")
    with pytest.raises(benchmark_input.BenchError, match="lacks columns"):
        benchmark_input.read_labels(str(bad), images)


def test_missing_flags_are_one_line_usage_errors(capsys):
    assert benchmark_input.main(["benchmark_input"]) == 2
    err = capsys.readouterr().err
    assert err == "benchmark_input: error: missing required flag(s): --labels, --images\n"


def test_summary_ratios():
    def stage(img_s: float, rss: float = 100.0) -> dict[str, float]:
        return {"img_s": img_s, "img_per_cpu_s": img_s, "cores_used": 1.0, "peak_rss_mb": rss}

    res = {"seed": stage(30), "host": stage(1800, 500), "full": stage(900), "floor": stage(1000)}
    res["host_big"] = stage(1800, 520)
    summary = benchmark_input.summarise(res, cores=2)
    assert set(summary) >= REQUIRED_KEYS
    assert summary["host_vs_seed"] == 60 and summary["full_vs_seed"] == 30
    assert summary["host_vs_floor"] == 0.9 and summary["peak_rss_mb"] == 500
    assert summary["rss_growth"] == pytest.approx(0.04)


def test_median_trial_is_the_middle_run_by_throughput():
    runs = [{"img_s": v, "peak_rss_mb": 100 + v} for v in (5.0, 1.0, 3.0, 4.0)]
    assert benchmark_input.median_trial(runs[:3])["peak_rss_mb"] == 103.0
    assert benchmark_input.median_trial(runs)["img_s"] == 3.0  # even count: the lower middle
    with pytest.raises(benchmark_input.BenchError, match="--trials"):
        benchmark_input.median_trial([])


@pytest.mark.slow
@requires_tf_keras
def test_tiny_end_to_end_run_writes_the_json(tmp_path):
    # 15-90 s by machine load: four stage processes and the converter's workers import TF.
    labels, images = _write_sample(tmp_path)
    out = tmp_path / "bench.json"
    argv = ["benchmark_input", f"--labels={labels}", f"--images={images}", f"--json={out}"]
    argv += ["--replicate=2", "--growth=0", "--seconds=0.3", "--image_size=48", "--trials=1"]
    argv += ["--record_size=64", "--batch_size=4", f"--work_dir={tmp_path}"]
    assert benchmark_input.main(argv) == 0
    summary = json.loads(out.read_text())
    assert set(summary) >= REQUIRED_KEYS
    assert summary["images"] == 6 and "rss_growth" not in summary
    assert all(len(v) == 1 for v in summary["trials_img_s"].values())
    assert all(summary[k] > 0 for k in ("seed_img_s", "host_img_s", "full_img_s"))
