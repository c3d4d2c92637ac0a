"""Plots the time-to-accuracy duel of `tools.benchmark_real --compare_seed` as a PNG.

    python -m tools.plot_duel --json OUTPUT/benchmark_real.json --output docs/duel.png
        [--title TEXT]

Reads the JSON's `seed_comparison`: both validation curves (wall minutes since each side's
start, val MAE; ours includes the conversion when `our_curve_includes_convert_minutes`), both
final MAEs, and marks where ours first reaches the seed's final MAE. The numbers are the
JSON's; the plot only draws them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.core.errors import Error


class PlotError(Error, ValueError):
    """The JSON has no duel to plot; the message is one line."""


@dataclasses.dataclass
class PlotConfig:
    """The plot's settings (its flags)."""

    json: str = option("", "benchmark_real's JSON (with --compare_seed).", required=True)
    output: str = option("", "PNG to write.", required=True)
    title: str = option("", "Title (default: from the JSON's budget and inputs).")


def comparison(result: dict[str, Any], path: str) -> dict[str, Any]:
    """Returns the JSON's seed_comparison with both curves, or raises PlotError."""
    duel = result.get("seed_comparison")
    if not isinstance(duel, dict) or not duel.get("our_curve") or not duel.get("seed_curve"):
        raise PlotError(f"{path} has no seed_comparison curves (run benchmark_real --compare_seed)")
    return duel


def plot(config: PlotConfig) -> None:
    """Draws the two curves into config.output."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    try:
        result = json.loads(pathlib.Path(config.json).read_text())
    except (OSError, ValueError) as e:
        raise PlotError(f"cannot read {config.json}: {e}") from None
    duel = comparison(result, config.json)
    fig = Figure(figsize=(8.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ours_label = "ours: convert + tf.data + on-device augmentation"
    if duel.get("our_curve_includes_convert_minutes"):
        ours_label += f" (conversion {duel.get('convert_minutes', 0):.1f} min included)"
    for key, label, style in (
        ("our_curve", ours_label, "o-"),
        ("seed_curve", "seed: ImageDataGenerator.flow_from_dataframe, 1 thread", "s-"),
    ):
        minutes, mae = zip(*duel[key], strict=True)
        ax.plot(minutes, mae, style, markersize=3, label=label)
    target = duel.get("seed_final_mae_months")
    reached = duel.get("ours_minutes_to_seed_final")
    if target is not None:
        ax.axhline(target, color="grey", linewidth=0.8, linestyle="--")
        if reached is not None:
            ax.plot([reached], [target], "k*", markersize=10)
            ax.annotate(
                f"ours reaches the seed's final {target:.2f} at {reached:.1f} min "
                f"(ratio {duel.get('time_to_seed_final_ratio', float('nan')):.2f})",
                (reached, target),
                textcoords="offset points",
                xytext=(8, 10),
                fontsize=8,
            )
    ax.set_xlabel("wall minutes since start (validation passes excluded)")
    ax.set_ylabel("val MAE (months)")
    ax.set_yscale("log")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8)
    budget = result.get("budget_minutes")
    ax.set_title(
        config.title
        or f"Time to accuracy, {f'{budget:g}-minute' if budget else 'the same'} budget each, "
        f"{'full-size PNGs' if result.get('seed_images') else 'the converted inputs'}",
        fontsize=10,
    )
    fig.tight_layout()
    out = pathlib.Path(config.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` and plots; returns the exit code."""
    return cli.main("plot_duel", PlotConfig, plot, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
