"""Learning proof: the quickstart's model beats the mean predictor, and uses the sex input.

    python -m tools.benchmark_learning [--output runs/benchmark_learning] [--json PATH]

Runs the quickstart (same phantom, same TFRecords, same seed) twice: with the sex input and
without it (`--nouse_sex`). Prints both validation MAEs, the mean predictor's MAE and the
ratios; the bar is MAE <= 0.5 x the mean predictor's, and a higher MAE without sex.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from collections.abc import Sequence

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.quickstart import job as quickstart
from tools import _summary


def run(output: str, seed: int = 0) -> dict[str, float]:
    """Trains and evaluates both variants; returns the figures printed."""
    base = quickstart.QuickstartConfig(output=output, seed=seed)
    with_sex = quickstart.run(base)
    without = quickstart.run(dataclasses.replace(base, use_sex=False, model_name="model_nosex"))
    mean_mae = with_sex["mean_predictor_mae_months"]
    result = {
        "seed": seed,
        "n_val": with_sex["n"],
        "mae_months": with_sex["mae_months"],
        "mae_months_no_sex": without["mae_months"],
        "mean_predictor_mae_months": mean_mae,
        "ratio_to_mean_predictor": with_sex["mae_months"] / mean_mae,
        "ratio_to_mean_predictor_no_sex": without["mae_months"] / mean_mae,
        "cores": os.cpu_count() or 1,
        "machine": platform.processor() or platform.machine(),
    }
    print()
    print(f"{'model':<22}{'val MAE (months)':>18}{'/ mean predictor':>18}")
    print(
        f"{'with sex input':<22}{result['mae_months']:>18.2f}{result['ratio_to_mean_predictor']:>18.3f}"
    )
    print(
        f"{'without sex input':<22}{result['mae_months_no_sex']:>18.2f}"
        f"{result['ratio_to_mean_predictor_no_sex']:>18.3f}"
    )
    print(f"{'mean predictor':<22}{mean_mae:>18.2f}{1.0:>18.3f}")
    bar = result["ratio_to_mean_predictor"] <= 0.5
    uses_sex = result["mae_months_no_sex"] > result["mae_months"]
    print(
        f"MAE <= 0.5 x mean predictor: {'yes' if bar else 'NO'}; sex input helps: "
        f"{'yes' if uses_sex else 'NO'}"
    )
    return result


@dataclasses.dataclass
class LearningConfig:
    """Settings of the learning proof."""

    output: str = option("runs/benchmark_learning", "Folder for both runs.")
    seed: int = option(0, "Seed of phantom, split and training.", min=0, max=2**31 - 1)
    json: str = option("", "Also write the figures as one JSON object here.")


def _job(config: LearningConfig) -> None:
    _summary.write_json(run(config.output, config.seed), config.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs; returns the exit status."""
    return cli.main("benchmark_learning", LearningConfig, _job, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
