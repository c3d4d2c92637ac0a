"""Tests for tools.benchmark_layout and resnet_small's channels_first variant."""

from __future__ import annotations

import json

from boneage_tpu.modeling import backbones
from tools import benchmark_layout


def test_channels_first_resnet_small_is_the_same_network_transposed() -> None:
    last = backbones.resnet_small(32)
    first = backbones.resnet_small(32, data_format="channels_first")
    assert last.output.shape[1:] == (1, 1, 192)
    assert first.output.shape[1:] == (192, 1, 1)
    assert last.count_params() == first.count_params()
    assert [w.shape for w in last.weights] == [w.shape for w in first.weights]


def test_one_tiny_run_reports_img_s_or_a_one_line_error(tmp_path, capsys) -> None:
    path = tmp_path / "layout.json"
    argv = ["benchmark_layout", "--image_size", "32", "--batch_size", "2", "--steps", "1"]
    argv += ["--loops", "1", "--precisions", "fp32", "--json", str(path)]
    assert benchmark_layout.main(argv) == 0
    summary = json.loads(path.read_text())
    rows = {r["layout"]: r for r in summary["results"]}
    assert set(rows) == set(benchmark_layout.LAYOUTS)
    assert rows["channels_last"]["img_s"] > 0
    first = rows["channels_first"]
    assert ("img_s" in first and first["img_s"] > 0) or "\n" not in first["error"]
    assert "img/s at 32 px, batch 2" in capsys.readouterr().out
