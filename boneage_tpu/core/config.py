"""Training configuration: the user's settings of a run, and the values derived from its data.

`TrainConfig` composes one dataclass per concern (data, model, augment, optim, schedule,
runtime); each field declares its flag with `option`, and the flag names stay flat
(`--learning_rate` sets `config.optim.learning_rate`). It is saved as the model directory's
config.json and never changed by a run. `Derived` holds what the run derives from the data
(label statistics, the stored image format) and fits after training (the bias correction);
it is saved beside it as derived.json. Both files are written and read by
`boneage_tpu.core.model_dir`. The module is ~490 lines because it is where each of the
trainer's ~60 flags declares its help text, choices and range, once.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from boneage_tpu.core import options
from boneage_tpu.core.errors import UsageError
from boneage_tpu.core.options import group, option

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
# The TTA modes (besides "none", the plain prediction) that can have their own bias correction;
# inference.runner.TTA_MODES names the same views.
TTA_CORRECTION_MODES = ("flip", "rotflip")
# Conformal interval scores: |true - predicted| months, or that over the bins head's spread.
INTERVAL_SCALES = ("absolute", "spread")


@dataclasses.dataclass
class DataConfig:
    """The training data: where it is, which splits, sampling, the input size and batch."""

    path: str = option(
        "",
        "TFRecord folder from boneage-make-tfrecords (local or gs://; holds manifest.json).",
        required=True,
        flag="data",
    )
    image_size: int = option(
        299,
        "Square training size in pixels (images are resized to fit, then padded).",
        min=8,
        max=4096,
    )
    batch_size: int = option(
        32,
        "GLOBAL batch size over all replicas; must be divisible by the replica count (on TPU a "
        "per-core batch that is a multiple of 8, ideally 128, keeps the MXUs full).",
        min=1,
        max=BIG,
    )
    eval_batch_size: int = option(
        0, "Global validation batch size (0: same as --batch_size).", min=0, max=BIG
    )
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


@dataclasses.dataclass
class ModelConfig:
    """The network: backbone, sex branch, head and the post-training bias fit."""

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
    fit_bias_correction: bool = option(
        False,
        "After training, fit true ~ slope * predicted + intercept on the --val_split "
        "predictions (Deeplasia's linear bias correction): one line for the plain predictions "
        "(applied by predict and the exports) and one per TTA mode up to "
        "--bias_correction_tta; stored in derived.json, evaluate --tta MODE applies MODE's.",
    )
    bias_correction_tta: str = option(
        "flip",
        "The TTA modes --fit_bias_correction fits a line for, in one pass over the views of "
        "the widest: none (plain only) | flip (plain and flip: 2 views) | rotflip (plain, flip "
        "and rotflip: 10 views).",
        choices=("none", *TTA_CORRECTION_MODES),
    )
    fit_intervals: bool = option(
        False,
        "After training, store split-conformal interval scores of the --val_split predictions "
        "for every TTA mode up to --bias_correction_tta (around the bias-corrected predictions "
        "when --fit_bias_correction): evaluate/predict --interval 0.9 then give low/high months.",
    )


@dataclasses.dataclass
class OptimConfig:
    """The optimizer, the loss and the batch-norm recalibration."""

    optimizer: str = option("adam", "adam | adamw.", choices=OPTIMIZERS)
    learning_rate: float = option(1e-3, "Peak learning rate (after warmup).", min=0, max=100)
    weight_decay: float = option(
        0.0, "Decoupled weight decay (needs --optimizer adamw).", min=0, max=1
    )
    loss: str = option(
        "l1", "Loss on the z-scored bone age: l1 | mse | huber (delta = 1 std).", choices=LOSSES
    )
    bn_recalibration_batches: int = option(
        0,
        "Before each checkpoint and validation, re-estimate the batch-norm moving statistics "
        "at the current weights from N augmented training batches (forward only); the "
        "running averages lag behind fast-moving weights. 0: off.",
        min=0,
        max=100000,
    )


@dataclasses.dataclass
class ScheduleConfig:
    """Steps, learning-rate schedule, loop, validation and checkpoint cadence, time budget."""

    train_steps: int = option(
        1000, "Total optimizer steps (a resumed run continues up to this step).", min=0, max=BIG
    )
    warmup_steps: int = option(0, "Linear learning-rate warmup steps.", min=0, max=BIG)
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
    max_train_minutes: float = option(
        0.0,
        "Stop at the first loop end after this much training wall time, then checkpoint, "
        "validate and export as at the end (0: no limit). With the cosine schedule its end is "
        "re-fitted after every loop so that it anneals with the budget.",
        min=0,
        max=BIG,
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """On-device augmentation: whether it runs, and the ranges each image draws its values from.

    Attributes:
      enabled: augment at all (the trainer passes no config to the step when off).
      rotation_deg: rotation in [-r, r] degrees (positive = counter-clockwise on screen).
      shift: translation in [-s, s] x width (x) and x height (y), drawn independently.
      zoom: isotropic scale range (min, max); > 1 enlarges the content.
      shear: x-shear coefficient (tan of the shear angle) in [-k, k]. Keras 3 `RandomShear`
        reads 0.2 this way; the seed's tf_keras ImageDataGenerator read `shear_range=0.2` as
        degrees, which is practically no shear.
      flip: horizontal flip with probability 1/2.
      brightness: additive shift in [-b, b] x 255.
      contrast: factor range (min, max) applied about the per-image mean.
      gamma: exponent range (min, max) applied to the 0..1 intensities.
    """

    # Field names are the ranges' own; the flags keep their aug_ prefix.
    enabled: bool = option(
        True,
        "On-device random affine + intensity augmentation (--noaugment disables).",
        flag="augment",
    )
    rotation_deg: float = option(
        20.0, "Augmentation: rotation range +-degrees.", min=0, max=180, flag="aug_rotation_deg"
    )
    shift: float = option(
        0.2,
        "Augmentation: translation range +-fraction of the image side.",
        min=0,
        max=1,
        flag="aug_shift",
    )
    zoom: tuple[float, ...] = option(
        (0.8, 1.2),
        "Augmentation: zoom range min,max (>1 enlarges).",
        min=0.01,
        max=100,
        flag="aug_zoom",
    )
    shear: float = option(
        0.2, "Augmentation: x-shear coefficient range +-k.", min=0, max=10, flag="aug_shear"
    )
    flip: bool = option(True, "Augmentation: random horizontal flip.", flag="aug_flip")
    brightness: float = option(
        0.1,
        "Augmentation: additive brightness range +-fraction of 255.",
        min=0,
        max=1,
        flag="aug_brightness",
    )
    contrast: tuple[float, ...] = option(
        (0.8, 1.2),
        "Augmentation: contrast factor range min,max (about the image mean).",
        min=0.01,
        max=100,
        flag="aug_contrast",
    )
    gamma: tuple[float, ...] = option(
        (0.8, 1.25),
        "Augmentation: gamma range min,max (wide ranges teach export-window invariance).",
        min=0.01,
        max=100,
        flag="aug_gamma",
    )

    def __post_init__(self) -> None:
        for name in ("zoom", "contrast", "gamma"):
            pair = tuple(getattr(self, name))
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise UsageError(f"--aug_{name} must be min,max with 0 < min <= max, got {pair}")
        for name in ("rotation_deg", "shift", "shear", "brightness"):
            if getattr(self, name) < 0:
                raise UsageError(f"--aug_{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """Returns the identity ranges (`augment_batch` == `to_float`), switched off."""
        return cls(
            enabled=False,
            rotation_deg=0.0,
            shift=0.0,
            zoom=(1.0, 1.0),
            shear=0.0,
            flip=False,
            brightness=0.0,
            contrast=(1.0, 1.0),
            gamma=(1.0, 1.0),
        )

    @property
    def geometric(self) -> bool:
        """Whether any geometric transform is enabled."""
        return bool(self.rotation_deg or self.shift or self.shear or self.flip) or (
            tuple(self.zoom) != (1.0, 1.0)
        )

    @property
    def photometric(self) -> bool:
        """Whether any intensity jitter is enabled."""
        return (
            bool(self.brightness)
            or tuple(self.contrast) != (1.0, 1.0)
            or (tuple(self.gamma) != (1.0, 1.0))
        )


@dataclasses.dataclass
class RuntimeConfig:
    """Where and how the computation runs: TPU or CPU devices, precision, XLA."""

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
    precision: str = option(
        "auto",
        "auto (bf16 on TPU and on GPUs of compute capability >= 8.0, fp16 with loss scaling on "
        "older GPUs, fp32 on CPU unless --cpu_bf16) | bf16 | fp16 (not on TPU) | fp32.",
        choices=PRECISION_CHOICES,
    )
    cpu_bf16: bool = option(
        False,
        "With --precision auto on a CPU that computes bfloat16 natively (AVX-512 BF16 or AMX, "
        "from /proc/cpuinfo): mixed bf16 instead of fp32. Other CPUs stay fp32.",
    )
    jit_compile: str = option(
        "auto",
        "XLA for the replica step (one device: augment to optimizer update; several: augment "
        "to gradients): auto (on for GPU; TPU always compiles; off on CPU, where XLA is "
        "slower) | yes | no.",
        choices=AUTO_YES_NO,
    )


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run, as the user gave it; saved as config.json.

    The flags of `python -m boneage_tpu.train` are the `option` fields here and in the groups.
    """

    model_dir: str = option(
        "",
        "Output folder (local or gs://): config, checkpoints, TensorBoard logs, exports. "
        "Rerunning with the same folder resumes from its latest checkpoint.",
        required=True,
    )
    seed: int = option(0, "Seed for weights, data order and augmentation.", min=0, max=2**31 - 1)
    data: DataConfig = group(DataConfig)
    model: ModelConfig = group(ModelConfig)
    augment: AugmentConfig = group(AugmentConfig)
    optim: OptimConfig = group(OptimConfig)
    schedule: ScheduleConfig = group(ScheduleConfig)
    runtime: RuntimeConfig = group(RuntimeConfig)

    def to_json(self) -> str:
        """Returns the config as pretty JSON, one object per group."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_flags(cls, **values: Any) -> TrainConfig:
        """Builds a config from flag names: `from_flags(data="d", learning_rate=0.1)`.

        Values are checked against their flags' ranges and choices; required flags may be
        left empty (a config that only builds a model needs no --data or --model_dir).

        Raises:
          UsageError: an unknown name or a value out of its flag's range.
        """
        return options.from_flat(cls, values, required=False)


@dataclasses.dataclass
class Derived:
    """What a run derives from its data and fits after training; saved as derived.json.

    Attributes:
      label_mean: mean bone age of the training labels (months); targets are z-scored with it.
      label_std: their standard deviation (months), > 0.
      data_image_size: the longest side the data was stored at (0: unknown, an old run).
      data_encoding: the stored image encoding (jpeg | png | raw; "" unknown).
      data_jpeg_quality: the stored JPEG quality.
      data_crop: the converter's crop (none | hand: `boneage-make-tfrecords --crop`); predict
        applies it to new images before the resize. "none" for runs from before it existed.
      data_crop_margin: the hand crop's margin (`--crop_margin`; 0.0 with crop none).
      schema_version: the record schema version of the data (0: unknown).
      bias_slope: the linear bias correction fitted on the plain (TTA "none") validation
        predictions (`heads.fit_linear_correction`); part of the model that the checkpoints
        restore into and the exports hold, applied by evaluate --tta none and predict.
      bias_intercept: its intercept (months). Identity (1, 0) until fitted.
      tta_corrections: the corrections fitted on the TTA-averaged validation predictions,
        {mode: (slope, intercept)} for the modes of `TTA_CORRECTION_MODES` that were fitted;
        a line fitted to plain predictions does not fit averaged ones, so evaluate --tta MODE
        applies only this mode's line.
      train_split: the split(s) trained on (the other folds' under --fold; "" unknown).
      val_split: the split validated on (the fold's under --fold).
      interval_scores: split-conformal calibration scores fitted on the validation predictions,
        {mode: {scale: sorted scores}} (`inference.intervals`; scales `INTERVAL_SCALES`), each
        mode's around the predictions its bias correction gives.
    """

    label_mean: float = 0.0
    label_std: float = 1.0
    data_image_size: int = 0
    data_encoding: str = ""
    data_jpeg_quality: int = 95
    data_crop: str = "none"
    data_crop_margin: float = 0.0
    schema_version: int = 0
    bias_slope: float = 1.0
    bias_intercept: float = 0.0
    tta_corrections: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    train_split: str = ""
    val_split: str = ""
    interval_scores: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)

    def correction(self, tta: str) -> tuple[float, float] | None:
        """Returns the (slope, intercept) fitted for TTA mode `tta`, or None when none was.

        The plain mode's line is `bias_slope`/`bias_intercept`. The identity counts as not
        fitted: it is what `heads.fit_linear_correction` returns for a model it cannot improve.
        """
        if tta == "none":
            line = (self.bias_slope, self.bias_intercept)
        else:
            line = tuple(map(float, self.tta_corrections.get(tta, (1.0, 0.0))))
        return None if line == (1.0, 0.0) else line

    def intervals(self, tta: str, scale: str) -> list[float] | None:
        """Returns the sorted conformal scores fitted for TTA mode `tta` and `scale`, or None."""
        return self.interval_scores.get(tta, {}).get(scale)

    def fitted_modes(self) -> list[str]:
        """Returns the TTA modes that have a fitted correction, in `TTA_CORRECTION_MODES` order."""
        return [m for m in ("none", *TTA_CORRECTION_MODES) if self.correction(m) is not None]

    def to_json(self) -> str:
        """Returns the values as pretty JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def join(base: str, *parts: str) -> str:
    """Joins path parts with '/', for local paths and gs:// alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
