"""`boneage-evaluate` / `python -m boneage_tpu.evaluate`: evaluates trained models on a split.

The settings and what is written: `boneage_tpu.evaluate.job` (printed by --help).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from boneage_tpu import cli
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import tpu_runtime


def _job(config: Any) -> None:
    from boneage_tpu.evaluate import job, report

    result = job.run(config)
    if config.continuous:
        print(f"evaluated steps {result['evaluated_steps']}; stopped: {result['stop_reason']}")
        return
    report_path = config_lib.join(result["output"], report.REPORT_HTML_NAME)
    skipped = result.get("conversion_skipped") or 0
    # Beside every MAE: rows the converter dropped are not in it.
    dropped = f", {skipped} CSV rows skipped at conversion (manifest: skipped)" if skipped else ""
    if result["mae_months"] is None:
        print(f"n={result['n']}{dropped}, no labels: predictions only; report: {report_path}")
    else:
        print(
            f"mae_months {result['mae_months']:.3f} (mean predictor "
            f"{result['mean_predictor_mae_months']:.3f}) n={result['n']}{dropped}; "
            f"report: {report_path}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs the job; returns exit code."""
    argv = sys.argv if argv is None else argv
    # The TPU runtime is chosen by environment variables TensorFlow reads at its import.
    tpu_runtime.prepare_command("evaluate", argv)
    from boneage_tpu.evaluate import job

    return cli.main("evaluate", job.EvalConfig, _job, argv, job.__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
