"""Training configuration: every setting of a run, saved as the model directory's config.json.

The model directory's layout, and its readers and writers, are in `boneage_tpu.core.model_dir`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from boneage_tpu.cli import option
from boneage_tpu.core.errors import UsageError

# Choices of the string settings (model.py and optim.py build what they name).
BACKBONES = (
    "xception",
    "inception_v3",
    "vgg19",
    "efficientnetv2_s",
    "resnet50",
    "convnext_tiny",
    "convnext_small",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "resnet_small",
    "tiny",
)
INPUT_NORMS = ("none", "zscore", "percentile")
HEADS = ("regression", "bins")
NORMS = ("batch", "group", "none")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant", "plateau")
LOSSES = ("l1", "mse", "huber")
PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32")
AUTO_YES_NO = ("auto", "yes", "no")
BIG = 10**9  # The upper bound of counts that have no natural one.


# Tuple fields holding a (min, max) float range.
FLOAT_PAIRS = ("aug_zoom", "aug_contrast", "aug_gamma")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; saved as config.json in the model directory.

    The `option` fields are the flags of `python -m boneage_tpu.train`; the others are filled
    from the data manifest at the start of training.
    """

    data: str = option(
        "",
        "TFRecord folder from boneage-make-tfrecords (local or gs://; holds manifest.json).",
        required=True,
    )
    model_dir: str = option(
        "",
        "Output folder (local or gs://): config, checkpoints, TensorBoard logs, exports. "
        "Rerunning with the same folder resumes from its latest checkpoint.",
        required=True,
    )
    backbone: str = option(
        "xception",
        "Image network: keras.applications backbones, or `tiny` (small CPU-fast CNN).",
        choices=BACKBONES,
    )
    weights: str = option(
        "none",
        "Initial backbone weights: none | imagenet (downloads; needs internet) | PATH to a "
        "weights file (e.g. the keras.applications *_notop.h5; gs:// allowed).",
    )
    image_size: int = option(
        299,
        "Square training size in pixels (images are resized to fit, then padded).",
        min=8,
        max=4096,
    )
    use_sex: bool = option(
        True, "Feed the sex through a Dense(sex_units) branch (--nouse_sex: image only)."
    )
    sex_units: int = option(32, "Width of the sex branch.", min=1, max=65536)
    dense_units: tuple[int, ...] = option(
        (256, 128),
        "Comma-separated widths of the dense layers after image+sex, e.g. 256,128.",
        min=1,
        max=65536,
    )
    dropout: float = option(0.2, "Dropout after each dense layer (0 disables).", min=0, max=0.99)
    attention: bool = option(
        False,
        "Light attention head: a learned spatial mask weights the backbone features before "
        "pooling.",
    )
    norm: str = option(
        "batch",
        "Normalisation of the tiny backbone (batch | group | none); others keep theirs.",
        choices=NORMS,
    )
    input_norm: str = option(
        "none",
        "Per-image intensity normalisation inside the model (also in exports): none | zscore "
        "(image mean/std) | percentile (1st-99th percentile window). Makes predictions "
        "independent of the exporter's brightness/contrast window.",
        choices=INPUT_NORMS,
    )
    head: str = option(
        "regression",
        "regression (one z-score) | bins (softmax over --num_bins age bins; prediction = "
        "expectation, spread = per-image uncertainty).",
        choices=HEADS,
    )
    num_bins: int = option(
        64, "Age bins of the bins head (evenly spaced over +-3.5 label std).", min=2, max=4096
    )
    batch_size: int = option(
        32,
        "GLOBAL batch size over all replicas; must be divisible by the replica count (on TPU a "
        "per-core batch that is a multiple of 8, ideally 128, keeps the MXUs full).",
        min=1,
        max=BIG,
    )
    train_steps: int = option(
        1000, "Total optimizer steps (a resumed run continues up to this step).", min=0, max=BIG
    )
    steps_per_loop: int = option(
        0,
        "Steps per compiled loop call and progress line (0: 100 on TPU, 10 else).",
        min=0,
        max=BIG,
    )
    eval_every: int = option(
        0, "Validate on --val_split every N steps (0: only at the end).", min=0, max=BIG
    )
    checkpoint_every: int = option(
        500, "Save a checkpoint every N steps (and always at the end).", min=1, max=BIG
    )
    keep_checkpoints: int = option(3, "Number of checkpoints to keep.", min=1, max=BIG)
    learning_rate: float = option(1e-3, "Peak learning rate (after warmup).", min=0, max=100)
    warmup_steps: int = option(0, "Linear learning-rate warmup steps.", min=0, max=BIG)
    weight_decay: float = option(
        0.0, "Decoupled weight decay (needs --optimizer adamw).", min=0, max=1
    )
    optimizer: str = option("adam", "adam | adamw.", choices=OPTIMIZERS)
    lr_schedule: str = option(
        "cosine",
        "After warmup: cosine (to 0 at train_steps) | constant | plateau (cut by "
        "--plateau_factor after --plateau_patience validations without improvement).",
        choices=SCHEDULES,
    )
    plateau_patience: int = option(
        3, "Validations without a better val MAE before a plateau cut.", min=1, max=BIG
    )
    plateau_factor: float = option(0.5, "Learning-rate multiplier of a plateau cut.", min=0, max=1)
    loss: str = option(
        "l1", "Loss on the z-scored bone age: l1 | mse | huber (delta = 1 std).", choices=LOSSES
    )
    precision: str = option(
        "auto",
        "auto (bf16 on TPU and on GPUs of compute capability >= 8.0, fp16 with loss scaling on "
        "older GPUs, fp32 on CPU) | bf16 | fp16 (not on TPU) | fp32.",
        choices=PRECISION_CHOICES,
    )
    jit_compile: str = option(
        "auto",
        "XLA for the replica step (one device: augment to optimizer update; several: augment "
        "to gradients): auto (on for GPU; TPU always compiles; off on CPU, where XLA is "
        "slower) | yes | no.",
        choices=AUTO_YES_NO,
    )
    augment: bool = option(
        True, "On-device random affine + intensity augmentation (--noaugment disables)."
    )
    aug_rotation_deg: float = option(
        20.0, "Augmentation: rotation range +-degrees.", min=0, max=180
    )
    aug_shift: float = option(
        0.2, "Augmentation: translation range +-fraction of the image side.", min=0, max=1
    )
    aug_zoom: tuple[float, ...] = option(
        (0.8, 1.2), "Augmentation: zoom range min,max (>1 enlarges).", min=0.01, max=100
    )
    aug_shear: float = option(0.2, "Augmentation: x-shear coefficient range +-k.", min=0, max=10)
    aug_flip: bool = option(True, "Augmentation: random horizontal flip.")
    aug_brightness: float = option(
        0.1, "Augmentation: additive brightness range +-fraction of 255.", min=0, max=1
    )
    aug_contrast: tuple[float, ...] = option(
        (0.8, 1.2),
        "Augmentation: contrast factor range min,max (about the image mean).",
        min=0.01,
        max=100,
    )
    aug_gamma: tuple[float, ...] = option(
        (0.8, 1.25),
        "Augmentation: gamma range min,max (wide ranges teach export-window invariance).",
        min=0.01,
        max=100,
    )
    max_train_minutes: float = option(
        0.0,
        "Stop at the first loop end after this much training wall time, then checkpoint, "
        "validate and export as at the end (0: no limit). With the cosine schedule its end is "
        "re-fitted after every loop so that it anneals with the budget.",
        min=0,
        max=BIG,
    )
    bn_recalibration_batches: int = option(
        0,
        "Before each checkpoint and validation, re-estimate the batch-norm moving statistics "
        "at the current weights from N augmented training batches (forward only); the "
        "running averages lag behind fast-moving weights. 0: off.",
        min=0,
        max=100000,
    )
    fit_bias_correction: bool = option(
        False,
        "After training, fit true ~ slope * predicted + intercept on the --val_split "
        "predictions (Deeplasia's linear bias correction); stored in config.json and applied "
        "by evaluate, predict and the exports.",
    )
    balance: str = option(
        "none",
        "Training sampling: none | age_sex (uniform over age band x sex strata).",
        choices=("none", "age_sex"),
    )
    cache: str = option(
        "auto",
        "Cache decoded images in RAM: auto (when the split fits the budget) | yes | no.",
        choices=AUTO_YES_NO,
    )
    seed: int = option(0, "Seed for weights, data order and augmentation.", min=0, max=2**31 - 1)
    train_split: str = option(
        "train",
        "Split to train on ('a+b' trains on the union, e.g. train+val for a final model).",
        required=True,
    )
    val_split: str = option("val", "Split validated during training ('' disables validation).")
    fold: int = option(
        -1,
        "K-fold training on data converted with --num_folds K: train on the other folds, "
        "validate on fold i (sets --train_split and --val_split); -1: off.",
        min=-1,
        max=BIG,
    )
    eval_batch_size: int = option(
        0, "Global validation batch size (0: same as --batch_size).", min=0, max=BIG
    )
    tpu: str = option(
        "",
        "TPU: colab | local (TPU VM) | NAME | grpc://HOST:PORT. Empty: GPUs/CPU (TF_CONFIG -> "
        "multi-worker).",
    )
    virtual_cpus: int = option(
        0,
        "Split the CPU into N logical devices under MirroredStrategy (multi-replica runs on a "
        "laptop; 0/1: one device).",
        min=0,
        max=4096,
    )
    # Filled from the data manifest at the start of training (targets are z-scored with them).
    label_mean: float = 0.0
    label_std: float = 1.0
    data_image_size: int = 0
    data_encoding: str = ""
    data_jpeg_quality: int = 95
    schema_version: int = 0
    # Fitted on the validation predictions after training (heads.fit_linear_correction);
    # applied by evaluate, predict and the exports. Identity until fitted.
    bias_slope: float = 1.0
    bias_intercept: float = 0.0

    def __post_init__(self) -> None:
        for name in FLOAT_PAIRS:
            pair = tuple(getattr(self, name))
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise UsageError(f"--{name} must be min,max with 0 < min <= max, got {pair}")

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
        for name in FLOAT_PAIRS:
            if name in kwargs:
                kwargs[name] = tuple(float(v) for v in kwargs[name])
        return cls(**kwargs)


def join(base: str, *parts: str) -> str:
    """Joins path parts with '/', for local paths and gs:// alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
