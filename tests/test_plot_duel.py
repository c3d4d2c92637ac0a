"""Tests for tools.plot_duel: the duel's curves drawn from benchmark_real's JSON."""

from __future__ import annotations

import json

from PIL import Image

from tools import plot_duel


def _result(**duel) -> dict:
    return {"budget_minutes": 60.0, "seed_images": "/x", "seed_comparison": duel}


def test_plots_both_curves_into_a_png(tmp_path, capsys) -> None:
    path = tmp_path / "r.json"
    duel = {
        "our_curve": [[3.0, 20.0], [10.0, 12.0], [55.0, 8.0]],
        "seed_curve": [[15.0, 25.0], [58.0, 14.0]],
        "seed_final_mae_months": 14.0,
        "ours_minutes_to_seed_final": 10.0,
        "time_to_seed_final_ratio": 10.0 / 58.0,
        "our_curve_includes_convert_minutes": True,
        "convert_minutes": 2.5,
    }
    path.write_text(json.dumps(_result(**duel)))
    out = tmp_path / "docs" / "duel.png"
    assert plot_duel.main(["plot_duel", "--json", str(path), "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (800, 450)
    assert f"wrote {out}" in capsys.readouterr().out


def test_a_json_without_a_duel_is_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"budget_minutes": 60.0}))
    status = plot_duel.main(["plot_duel", "--json", str(path), "--output", str(tmp_path / "p.png")])
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1
    assert "has no seed_comparison curves" in err
    assert not (tmp_path / "p.png").exists()
