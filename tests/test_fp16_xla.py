"""fp16 with one replica under XLA: the whole step (LossScaleOptimizer included) is compiled.

That is the T4/V100 default (one GPU, --precision auto = fp16, --jit_compile auto = yes), and
the same path a single-worker MultiWorkerMirroredStrategy takes (its replica context uses the
mirrored merge_call, keras#21366). On CPU with jit_compile=True (the XLA bridge GPUs use): an
overflowing step is skipped and halves the scale, a normal one is applied.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

SIZE = 16


def run_steps(kind: str) -> dict[str, object]:
    """Runs one overflowing and one normal fp16 step under `kind` ("default" or "mwms")."""
    import tensorflow as tf

    from boneage_tpu.core import config as config_lib
    from boneage_tpu.modeling import model as model_lib
    from boneage_tpu.modeling import optim
    from boneage_tpu.train import loop, setup
    from tests import helpers

    strategy = (
        tf.distribute.get_strategy()
        if kind == "default"
        else tf.distribute.MultiWorkerMirroredStrategy()
    )
    assert strategy.num_replicas_in_sync == 1
    config = config_lib.TrainConfig.from_flags(precision="fp16", jit_compile="yes")
    settings = setup.resolve_settings(config, "gpu", 1)
    assert settings["jit_compile"] and settings["xla"] == "whole step"
    with strategy.scope():
        model = model_lib.build_model(
            *helpers.config_and_derived(
                backbone="tiny", image_size=SIZE, dense_units=(8,), dropout=0.0, norm="none",
                label_mean=100.0, label_std=50.0,
            ),
            precision="fp16",
        )  # fmt: skip
        optimizer = optim.make_optimizer(
            name="adam", learning_rate=1e-3, warmup_steps=0, total_steps=10,
            schedule="constant", loss_scale=True,
        )  # fmt: skip
        optimizer.build(model.trainable_variables)
    trainer = loop.TrainLoop(
        strategy, model, optimizer, global_batch=2, label_std=50.0, loss="mse",
        jit_compile=settings["jit_compile"],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    # 1e6-month labels: the mse gradient overflows fp16 after loss scaling; then normal labels.
    labels = np.array([[1e6, 1e6], [120.0, 60.0]], np.float32)
    stacked = {
        "image": rng.integers(0, 256, (2, 2, SIZE, SIZE, 1)).astype(np.uint8),
        "male": np.array([[0.0, 1.0]] * 2, np.float32),
        "boneage": labels,
        "mask": np.ones([2, 2], np.float32),
    }
    dataset = strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_tensor_slices(stacked)
    )
    iterator = iter(dataset)
    before = [np.array(v) for v in model.trainable_variables]
    scale = float(optimizer.dynamic_scale.numpy())
    first = trainer.train(iterator, 1)
    skipped = all(
        np.array_equal(b, np.array(v))
        for b, v in zip(before, model.trainable_variables, strict=True)
    )
    result = {
        "first_loss_finite": bool(np.isfinite(first.loss)),
        "skipped": skipped,
        "scale_ratio": float(optimizer.dynamic_scale.numpy()) / scale,
        "iterations_after_first": int(optimizer.iterations.numpy()),
    }
    trainer.train(iterator, 1)
    result["iterations_after_second"] = int(optimizer.iterations.numpy())
    result["changed"] = any(
        not np.array_equal(b, np.array(v))
        for b, v in zip(before, model.trainable_variables, strict=True)
    )
    result["finite"] = all(np.all(np.isfinite(np.array(v))) for v in model.trainable_variables)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["default", "mwms"])
def test_fp16_whole_step_compiles_and_skips_an_overflow(kind):
    # A fresh process each: a MultiWorkerMirroredStrategy configures the process's collectives.
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    code = f"import json; from tests.test_fp16_xla import run_steps; print(json.dumps(run_steps({kind!r})))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "first_loss_finite": True,
        "skipped": True,
        "scale_ratio": 0.5,
        "iterations_after_first": 0,
        "iterations_after_second": 1,
        "changed": True,
        "finite": True,
    }
