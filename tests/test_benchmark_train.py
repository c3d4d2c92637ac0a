"""Tests of tools.benchmark_train: flag errors and one tiny end-to-end run with --json."""

from __future__ import annotations

import json

import pytest

from tools import benchmark_train


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    def error(argv: list[str]) -> str:
        assert benchmark_train.main(["benchmark_train", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        return err

    assert "missing required flag(s): --data" in error([])
    assert "--backbones must be one of" in error([f"--data={tmp_path}", "--backbones=tiny,nope"])
    assert "'nope'" in error([f"--data={tmp_path}", "--backbones=tiny,nope"])
    assert "--xla must be one of no, yes, got 'maybe'" in error(
        [f"--data={tmp_path}", "--xla=maybe"]
    )


@pytest.mark.slow
def test_tiny_run_reports_real_ceiling_and_input_ratio(toy_dataset, tmp_path, capsys):
    records = toy_dataset(splits={"train": 16}, height=40, width=32)
    out = tmp_path / "bench.json"
    status = benchmark_train.main(
        [
            "benchmark_train",
            f"--data={records}",
            "--image_size=32",
            "--batch_size=4",
            "--steps=2",
            "--loops=2",
            f"--json={out}",
        ]
    )
    assert status == 0
    summary = json.loads(out.read_text())
    (result,) = summary["results"]
    assert (result["backbone"], result["precision"], result["xla"]) == ("tiny", "fp32", "no")
    assert len(result["real_loops"]) == len(result["ceiling_loops"]) == 2
    assert result["real_images_per_second"] > 0 and result["ceiling_images_per_second"] > 0
    assert result["input_ratio"] == pytest.approx(
        result["real_images_per_second"] / result["ceiling_images_per_second"]
    )
    assert summary["load_average_1min_before"] >= 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "load average" in printed
