"""Training configuration and the layout of a model directory (shared by train, evaluate, predict).

A model directory (local or gs://) holds:
  config.json                 every TrainConfig field + the data manifest's label stats
  checkpoints/ckpt-<step>.*   tf.train.CheckpointManager output (model, optimizer, step, rng)
  logs/train, logs/eval       TensorBoard event files
  export/model.keras          the trained Keras model (outputs months)
  export/saved_model/         SavedModel; signature `serving_default`:
                                image_bytes: string[None] (PNG/JPEG bytes), male: float32[None]
                                -> {"boneage_months": float32[None]}
  DONE                        JSON {"step": N}; written last, marks the training run finished
  eval/<split>-<step>/        evaluation outputs (metrics.json, predictions.csv, report.*)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import tensorflow as tf

CONFIG_NAME = "config.json"
DONE_NAME = "DONE"
CHECKPOINT_SUBDIR = "checkpoints"
EXPORT_SUBDIR = "export"
KERAS_EXPORT_NAME = "model.keras"
SAVED_MODEL_SUBDIR = "saved_model"
LOGS_SUBDIR = "logs"
EVAL_SUBDIR = "eval"


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; saved as config.json in the model directory."""

    data: str = ""
    model_dir: str = ""
    backbone: str = "xception"
    weights: str = "none"  # imagenet | none | PATH
    image_size: int = 299
    use_sex: bool = True
    sex_units: int = 32
    dense_units: tuple[int, ...] = (256, 128)
    dropout: float = 0.2
    attention: bool = False
    norm: str = "batch"  # batch | group | none: normalisation of the tiny backbone only
    batch_size: int = 32  # global
    train_steps: int = 1000
    steps_per_loop: int = 0  # 0: platform default (larger on TPU)
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw
    lr_schedule: str = "cosine"  # cosine | constant | plateau (each after the linear warmup)
    plateau_patience: int = 3  # evaluations without val MAE improvement before a plateau cut
    plateau_factor: float = 0.5  # learning-rate multiplier of a plateau cut
    loss: str = "l1"  # l1 | mse | huber (on the z-scored target)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    jit_compile: str = "auto"  # auto | yes | no: XLA for the replica step (always on TPU)
    augment: bool = True
    balance: str = "none"  # none | age_sex
    cache: str = "auto"  # auto | yes | no
    seed: int = 0
    val_split: str = "val"  # split evaluated during training ("" disables)
    eval_batch_size: int = 0  # global; 0: same as batch_size
    tpu: str = ""
    virtual_cpus: int = 0
    # Filled from the data manifest at the start of training (targets are z-scored with them).
    label_mean: float = 0.0
    label_std: float = 1.0
    data_image_size: int = 0
    data_encoding: str = ""
    data_jpeg_quality: int = 95
    schema_version: int = 0

    def to_json(self) -> str:
        """Returns the config as pretty JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict, ignoring keys that this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        if "dense_units" in kwargs:
            kwargs["dense_units"] = tuple(int(u) for u in kwargs["dense_units"])
        return cls(**kwargs)


def join(base: str, *parts: str) -> str:
    """Joins path parts with '/', for local paths and gs:// alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def save_config(config: TrainConfig) -> None:
    """Writes config.json into the model directory."""
    tf.io.gfile.makedirs(config.model_dir)
    with tf.io.gfile.GFile(join(config.model_dir, CONFIG_NAME), "w") as f:
        f.write(config.to_json())


def load_config(model_dir: str) -> TrainConfig:
    """Reads config.json from a model directory, with a one-line error when it is missing."""
    path = join(model_dir, CONFIG_NAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir} a boneage_tpu model directory?")
    with tf.io.gfile.GFile(path, "r") as f:
        return TrainConfig.from_dict(json.load(f))
