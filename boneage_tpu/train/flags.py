"""The trainer's absl flags: one per TrainConfig field, defined by a function (not at import)."""

from __future__ import annotations

import dataclasses

from absl import flags

from boneage_tpu.config import TrainConfig
from boneage_tpu.model import BACKBONES, NORMS
from boneage_tpu.optim import LOSSES, OPTIMIZERS, SCHEDULES

# Filled from the data manifest at the start of training; not user settings.
MANIFEST_FIELDS = (
    "label_mean",
    "label_std",
    "data_image_size",
    "data_encoding",
    "data_jpeg_quality",
    "schema_version",
)

CHOICES: dict[str, tuple[str, ...]] = {
    "backbone": BACKBONES,
    "norm": NORMS,
    "optimizer": OPTIMIZERS,
    "lr_schedule": SCHEDULES,
    "loss": LOSSES,
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "jit_compile": ("auto", "yes", "no"),
    "balance": ("none", "age_sex"),
    "cache": ("auto", "yes", "no"),
}

HELP: dict[str, str] = {
    "data": "TFRecord folder from tools.make_tfrecords (local or gs://; holds manifest.json).",
    "model_dir": "Output folder (local or gs://): config, checkpoints, TensorBoard logs, exports. "
    "Rerunning with the same folder resumes from its latest checkpoint.",
    "backbone": "Image network: keras.applications backbones, or `tiny` (small CPU-fast CNN).",
    "weights": "Initial backbone weights: none | imagenet (downloads; needs internet) | PATH to a "
    "weights file (e.g. the keras.applications *_notop.h5; gs:// allowed).",
    "image_size": "Square training size in pixels (images are resized to fit, then padded).",
    "use_sex": "Feed the sex through a Dense(sex_units) branch (--nouse_sex: image only).",
    "sex_units": "Width of the sex branch.",
    "dense_units": "Comma-separated widths of the dense layers after image+sex, e.g. 256,128.",
    "dropout": "Dropout after each dense layer (0 disables).",
    "attention": "Light attention head: a learned spatial mask weights the backbone features "
    "before pooling.",
    "norm": "Normalisation of the tiny backbone (batch | group | none); others keep theirs.",
    "batch_size": "GLOBAL batch size over all replicas; must be divisible by the replica count "
    "(on TPU a per-core batch that is a multiple of 8, ideally 128, keeps the MXUs full).",
    "train_steps": "Total optimizer steps (a resumed run continues up to this step).",
    "steps_per_loop": "Steps per compiled loop call and progress line (0: 100 on TPU, 10 else).",
    "eval_every": "Validate on --val_split every N steps (0: only at the end).",
    "checkpoint_every": "Save a checkpoint every N steps (and always at the end).",
    "keep_checkpoints": "Number of checkpoints to keep.",
    "learning_rate": "Peak learning rate (after warmup).",
    "warmup_steps": "Linear learning-rate warmup steps.",
    "weight_decay": "Decoupled weight decay (needs --optimizer adamw).",
    "optimizer": "adam | adamw.",
    "lr_schedule": "After warmup: cosine (to 0 at train_steps) | constant | plateau (cut by "
    "--plateau_factor after --plateau_patience validations without improvement).",
    "plateau_patience": "Validations without a better val MAE before a plateau cut.",
    "plateau_factor": "Learning-rate multiplier of a plateau cut.",
    "loss": "Loss on the z-scored bone age: l1 | mse | huber (delta = 1 std).",
    "precision": "auto (bf16 on TPU and on GPUs of compute capability >= 8.0, fp16 with loss "
    "scaling on older GPUs, fp32 on CPU) | bf16 | fp16 (not on TPU) | fp32.",
    "jit_compile": "XLA for the replica step (augment+model+loss+grads): auto (on for GPU; TPU "
    "always compiles; off on CPU, where XLA is slower) | yes | no.",
    "augment": "On-device random affine + intensity augmentation (--noaugment disables).",
    "balance": "Training sampling: none | age_sex (uniform over age band x sex strata).",
    "cache": "Cache decoded images in RAM: auto (when the split fits the budget) | yes | no.",
    "seed": "Seed for weights, data order and augmentation.",
    "val_split": "Split validated during training ('' disables validation).",
    "eval_batch_size": "Global validation batch size (0: same as --batch_size).",
    "tpu": "TPU: colab | local (TPU VM) | NAME | grpc://HOST:PORT. Empty: GPUs/CPU "
    "(TF_CONFIG -> multi-worker).",
    "virtual_cpus": "Split the CPU into N logical devices under MirroredStrategy (multi-replica "
    "runs on a laptop; 0/1: one device).",
}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one flag per user-settable TrainConfig field, with TrainConfig's defaults."""
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in MANIFEST_FIELDS:
            continue
        default = getattr(defaults, name)
        help_text = HELP[name]
        if name in CHOICES:
            flags.DEFINE_enum(name, default, CHOICES[name], help_text, flag_values=flag_values)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(v) for v in default], help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> TrainConfig:
    """Returns the TrainConfig of the parsed flags."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in MANIFEST_FIELDS:
            continue
        values[field.name] = flag_values[field.name].value
    try:
        values["dense_units"] = tuple(int(u) for u in values["dense_units"] if str(u).strip())
    except ValueError as err:
        raise ValueError(f"--dense_units must be comma-separated integers: {err}") from err
    return TrainConfig(**values)
