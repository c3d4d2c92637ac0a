"""Evaluates trained models on a TFRecord split: metrics.json, predictions.csv and a report.

  python -m boneage_tpu.evaluate --model_dir PATH --data PATH [--split val]
      [--checkpoint latest|STEP|export] [--tta none|flip|rotflip] [--output PATH] [--batch_size B]
      [--continuous [--timeout SECONDS]] [--tpu ...|--virtual_cpus N]
      [--gallery_size K | --no_gallery]

PATHs are local or gs://. Every record of the split is evaluated exactly once. Several
`--model_dir` flags evaluate the ensemble (mean of the members' predictions). `--continuous`
follows a training run and evaluates each new checkpoint once (see `boneage_tpu.evaluate.continuous`).
Outputs go to `--output`, default `MODEL_DIR/eval/<split>-<step>[-<tta>]/` (the first model
directory's, named `<split>-ensemble-<step>_<step>...` for ensembles). The report shows the
K worst and K best cases with heatmaps and the shortcut check (`boneage_tpu.evaluate.gallery`;
one extra pass over the split, the first model's maps); `--no_gallery` skips both.
"""

from __future__ import annotations

import sys
from typing import Any

import tensorflow as tf

from boneage_tpu.core import distribute
from boneage_tpu.evaluate import continuous
from boneage_tpu.evaluate.once import (
    EvalConfig,
    EvalError,
    evaluate_once,
    make_config,
    output_name,
    validate,
)

__all__ = ["EvalConfig", "EvalError", "evaluate_once", "output_name", "run"]


def run(
    config: EvalConfig | None = None,
    strategy: tf.distribute.Strategy | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Runs an evaluation job.

    Args:
      config: the settings; or pass EvalConfig's fields as keyword arguments instead
        (`model_dir="..."` is accepted for a single model).
      strategy: where to run; default: built from config.runtime (tpu, virtual_cpus).

    Returns:
      The metrics (as in metrics.json); with `continuous`, the summary of
      `continuous.run_continuous`.
    """
    config = make_config(config, kwargs)
    validate(config)
    if strategy is None:
        for model_dir in config.model_dirs:
            paths = {"--data": config.data, "--model_dir": model_dir}
            for warning in distribute.check_paths(config.runtime.tpu, paths):
                print(f"warning: {warning}", file=sys.stderr)
        strategy = distribute.make_strategy(
            tpu=config.runtime.tpu, virtual_cpus=config.runtime.virtual_cpus
        )
        print(f"evaluating on {distribute.describe(strategy)}")
    if config.continuous:
        return continuous.run_continuous(config, strategy)
    return evaluate_once(config, strategy)
