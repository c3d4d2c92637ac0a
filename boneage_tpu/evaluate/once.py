"""One evaluation of a model (or ensemble) at one checkpoint: the library behind `evaluate`.

A leaf of the evaluation package: `job` (the command) and `continuous` (following a training
run) both call `evaluate_once`; it imports neither. The report shows the K worst and K best
cases with heatmaps and the shortcut check (`gallery`; one extra pass over the split, the first
model's maps); `--no_gallery` skips both. Which bias correction applies, and whether it was
fitted on the evaluated records, is `corrections`'.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import html
import sys
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from boneage_tpu import __version__
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import distribute, schema
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core.config import BIG
from boneage_tpu.core.errors import Error, UsageError
from boneage_tpu.core.options import check, from_flat, group, option
from boneage_tpu.data import verify
from boneage_tpu.evaluate import corrections, gallery, metrics, report
from boneage_tpu.inference import heatmap, restore
from boneage_tpu.inference import runner as inference

CORRECTION_CHOICES = ("fitted", "none")


class EvalError(Error, ValueError):
    """Bad evaluation input or an inconsistent result; the message is one line."""


@dataclasses.dataclass
class EvalConfig:
    """Every setting of an evaluation job (the flags of `python -m boneage_tpu.evaluate`)."""

    model_dirs: tuple[str, ...] = option(
        (),
        "Training run folder (local or gs://); repeat it to evaluate an ensemble (mean of the "
        "members' predictions).",
        flag="model_dir",
    )
    data: str = option("", "TFRecord folder written by boneage-make-tfrecords.")
    split: str = option("val", "Split of the data to evaluate.")
    checkpoint: str = option("latest", "latest, export or a training step.")
    tta: str = option(
        "none",
        "flip: mean over the image and its mirror; rotflip: also rotated by -10, -5, 5 and 10 "
        "degrees (10 views).",
        choices=inference.TTA_MODES,
    )
    tta_fill: str = option(
        "black",
        "What the corners uncovered by rotflip's rotated views read: black (as the training "
        "augmentation pads) | background (each image's median border pixel).",
        choices=inference.TTA_FILLS,
    )
    correction: str = option(
        "fitted",
        "fitted: apply the bias correction the training run fitted for this --tta mode (none "
        "when it fitted none for it) | none: report the network's own predictions.",
        choices=CORRECTION_CHOICES,
    )
    interval: float = option(
        0.0,
        "Coverage level of split-conformal prediction intervals, e.g. 0.9 (0: none): "
        "low_months/high_months in predictions.csv and the heatmap titles, the empirical "
        "coverage and mean width in metrics.json. Needs a run trained with --fit_intervals.",
        min=0,
        max=0.999,
    )
    interval_scale: str = option(
        "absolute",
        "absolute: one half-width for every image | spread: the half-width scaled by the bins "
        "head's per-image spread (wider where the model is unsure).",
        choices=config_lib.INTERVAL_SCALES,
    )
    output: str = option(
        "",
        "Output folder; default MODEL_DIR/eval/<split>-<step> (with --continuous: the folder "
        "of the <split>-<step> folders).",
    )
    batch_size: int = option(
        0, "Global batch; 0: the training run's eval batch size.", min=0, max=BIG
    )
    continuous: bool = option(
        False,
        "Follow a training run: evaluate each new checkpoint once, until the run writes DONE "
        "or --timeout passes.",
    )
    timeout: float = option(
        3600.0,
        "Continuous: stop after this many seconds without a new checkpoint (0: never).",
        min=0,
        max=BIG,
    )
    poll_interval: float = option(
        10.0, "Continuous: seconds between looks at the model directory.", min=0, max=BIG
    )
    # The trainer's runtime flags: --tpu, --virtual_cpus, --precision, --jit_compile.
    runtime: config_lib.RuntimeConfig = group(config_lib.RuntimeConfig)
    gallery_size: int = option(
        gallery.DEFAULT_SIZE,
        "Worst and best cases shown with heatmaps in report.html (each).",
        min=0,
        max=BIG,
    )
    no_gallery: bool = option(
        False,
        "Skip the heatmap pass: no case gallery and no shortcut check (for huge runs).",
    )


def make_config(config: EvalConfig | None, kwargs: dict[str, Any]) -> EvalConfig:
    if config is not None and kwargs:
        raise TypeError("pass either an EvalConfig or keyword arguments, not both")
    if config is not None:
        return config
    # Keyword arguments are flag names (model_dir, tpu, precision...); model_dirs and a
    # single folder as a string are accepted too.
    dirs = kwargs.pop("model_dirs", kwargs.pop("model_dir", ()))
    kwargs["model_dir"] = (dirs,) if isinstance(dirs, str) else tuple(dirs)
    return from_flat(EvalConfig, kwargs, required=False)


def validate(config: EvalConfig) -> None:
    """Raises UsageError or EvalError for settings that cannot work, before any model is loaded."""
    check(config)
    if not config.model_dirs:
        raise UsageError("--model_dir is required (repeat it to evaluate an ensemble)")
    if not config.data:
        raise UsageError("--data is required: a folder written by boneage-make-tfrecords")
    if config.continuous and len(config.model_dirs) > 1:
        raise UsageError("--continuous follows one training run: give a single --model_dir")
    if config.interval and len(config.model_dirs) > 1:
        raise UsageError(
            "--interval uses one run's calibration scores: give a single --model_dir (an "
            "ensemble's mean has other residuals)"
        )
    if config.continuous and config.checkpoint not in ("latest", ""):
        raise UsageError("--continuous evaluates every new checkpoint: drop --checkpoint")


def read_data_manifest(data_dir: str, split: str) -> tuple[dict[str, Any], str]:
    """Returns the data folder's manifest (checked for `split`) and the sha256 of its bytes."""
    manifest = schema.read_manifest(data_dir)
    info = schema.split_info(manifest, split)
    if int(info.get("count", 0)) <= 0:
        raise EvalError(f"split {split!r} of {data_dir} has no records")
    with tf.io.gfile.GFile(config_lib.join(data_dir, schema.MANIFEST_NAME), "rb") as f:
        checksum = hashlib.sha256(f.read()).hexdigest()
    return manifest, checksum


def output_name(split: str, steps: Sequence[int | None], tta: str) -> str:
    """Returns the eval folder name: `<split>-<step>`, `-<tta>` for TTA, ensembles listed."""
    labels = ["export" if s is None else str(s) for s in steps]
    name = f"{split}-{labels[0]}" if len(labels) == 1 else f"{split}-ensemble-{'_'.join(labels)}"
    return name if tta == "none" else f"{name}-{tta}"


def _train_mean(manifest: dict[str, Any], derived: config_lib.Derived) -> tuple[float, str]:
    """Returns the training label mean for the naive baseline, and where it came from.

    The data manifest's stats when they are a train split's (the usual case: evaluating the
    val split of the training data); else, e.g. for a separately converted test set, the
    training data's mean that the trainer stored in derived.json.
    """
    stats = manifest.get("label_stats") or {}
    if stats.get("split") == "train" and stats.get("mean_months") is not None:
        return float(stats["mean_months"]), "data manifest label_stats (train split)"
    return float(derived.label_mean), "derived.json label_mean (the model's training data)"


def evaluate_once(
    config: EvalConfig,
    strategy: tf.distribute.Strategy,
    *,
    checkpoint: str | None = None,
    output: str | None = None,
    models: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates the model (or ensemble) at one checkpoint and writes every output.

    Args:
      config: the job's settings.
      strategy: where the models run.
      checkpoint: overrides `config.checkpoint` (the continuous mode passes steps).
      output: overrides the output folder.
      models: model_dir -> Keras model built earlier, restored into instead of building a new
        one (filled in when given; the continuous mode keeps one across checkpoints).

    Returns:
      The metrics dict written to metrics.json.
    """
    checkpoint = checkpoint or config.checkpoint or "latest"
    manifest, checksum = read_data_manifest(config.data, config.split)
    runtime = distribute.resolve_runtime(
        config.runtime, distribute.platform(strategy), strategy.num_replicas_in_sync
    )
    runs, raws, lines, members, train_mean, first = [], [], [], [], None, None
    in_sample, derived = False, []
    for model_dir in config.model_dirs:
        # derived.json alone tells whether the data fits: fail before building the model.
        restore.check_data_compatible(model_dir_lib.load_derived(model_dir), manifest, model_dir)
        reuse = models.get(model_dir) if models is not None and checkpoint != "export" else None
        with strategy.scope():
            loaded = restore.load_model(
                model_dir, checkpoint, model=reuse, precision=runtime["precision"]
            )
        if models is not None and checkpoint != "export":
            models[model_dir] = loaded.model
        print(
            f"evaluating {loaded.source} (step {loaded.step}) on {config.data} [{config.split}]"
            f", {runtime['precision']}, XLA {'on' if runtime['jit_compile'] else 'off'}"
        )
        batch_size = (
            config.batch_size or loaded.config.data.eval_batch_size or loaded.config.data.batch_size
        )
        try:
            predictions = inference.predict_split(
                loaded.model,
                config.data,
                config.split,
                manifest,
                image_size=restore.model_image_size(loaded),
                batch_size=batch_size,
                tta=config.tta,
                strategy=strategy,
                jit_compile=runtime["jit_compile"],
                tta_fill=config.tta_fill,
            )
        except tf.errors.DataLossError as e:  # Names no file: find the shard by its checksum.
            raise EvalError(
                verify.describe_read_failure(config.data, manifest, [config.split], e)
            ) from None
        # The model applies the plain predictions' line itself; each member's own predictions
        # are recovered exactly, then given the line fitted for this --tta mode.
        baked = restore.baked_correction(loaded.model)
        raw = corrections.uncorrected(predictions, baked)
        line = loaded.derived.correction(config.tta) if config.correction == "fitted" else None
        runs.append(predictions if line == baked else corrections.corrected(raw, line))
        raws.append(raw)
        lines.append(line)
        derived.append(loaded.derived)
        in_sample = in_sample or corrections.fitted_in_sample(loaded, config.data, config.split)
        members.append(
            {
                "model_dir": model_dir,
                "source": loaded.source,
                "step": loaded.step,
                "bias_correction": None
                if line is None
                else {"slope": line[0], "intercept": line[1]},
            }
        )
        first = first or (loaded, batch_size)
        train_mean = train_mean or _train_mean(manifest, loaded.derived)
    result, raw = inference.average(runs), inference.average(raws)
    status, note = corrections.correction_status(config.correction, config.tta, derived)
    if note:
        print(f"note: {note}")
    # A line fitted on the evaluated records scores better here than on new data: the
    # headline figures (and predictions.csv) are then the uncorrected ones.
    headline = raw if in_sample and any(line is not None for line in lines) else result
    if in_sample:
        print(
            f"note: the bias correction was fitted on {config.split} of {config.data}: "
            "mae_months is the uncorrected MAE; mae_corrected_months is in-sample"
        )
    expected = int(schema.split_info(manifest, config.split)["count"])
    if len(result.ids) != expected or len(set(result.ids)) != expected:
        raise EvalError(
            f"evaluated {len(result.ids)} records ({len(set(result.ids))} distinct ids) but the "
            f"manifest lists {expected} in split {config.split!r}: the data folder is inconsistent"
        )
    steps = [m["step"] for m in members]
    output = (
        output
        or config.output
        or model_dir_lib.eval_dir(
            config.model_dirs[0], output_name(config.split, steps, config.tta)
        )
    )
    values = metrics.regression_metrics(
        headline.boneage,
        headline.predicted,
        headline.male,
        train_mean_months=train_mean[0],
    )
    values["train_mean_source"] = train_mean[1]
    values.update(corrections.correction_metrics(result, raw, lines))
    interval = None
    if config.interval:
        interval, values["interval"] = corrections.interval_metrics(
            config.interval, config.interval_scale, config.tta, result, first[0], lines[0],
            corrections.fit_split_matches(first[0], config.data, config.split),
        )  # fmt: skip
    values.update(
        {
            "correction": config.correction,
            "bias_correction_status": status,
            "bias_correction_fitted_for": sorted({m for d in derived for m in d.fitted_modes()}),
            "in_sample": in_sample,
            "headline": "corrected"
            if headline is result and status == "applied"
            else "uncorrected",
        }
    )
    if config.tta != "none":
        values["tta_views"] = corrections.view_metrics(raw, config.tta)
    values.update(
        {
            "checkpoint_step": steps[0] if len(steps) == 1 else steps,
            "models": members,
            "tta": config.tta,
            "tta_fill": config.tta_fill,
            "data": config.data,
            "split": config.split,
            "data_manifest_sha256": checksum,
            # Rows of the converted CSV the converter skipped (every split's; listed in the
            # manifest's "skipped"): an MAE over what was left can flatter.
            "conversion_skipped": int(manifest.get("rows_skipped", 0)),
            "conversion_rows_in": manifest.get("rows_in"),
            "output": output,
            "boneage_tpu_version": __version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
    )
    section = ""
    if not config.no_gallery:
        try:
            section, values["shortcut_check"] = gallery.build(
                first[0].model,
                first[0].model_dir,
                config.data,
                config.split,
                manifest,
                headline,
                image_size=restore.model_image_size(first[0]),
                batch_size=first[1],
                size=config.gallery_size,
                strategy=strategy,
                interval=None
                if interval is None or headline is not result
                else (interval.low, interval.high, interval.level),
            )
        except heatmap.HeatmapError as e:
            print(f"warning: no heatmaps: {e}", file=sys.stderr)
            section = f"<p>No heatmaps: {html.escape(str(e))}</p>"
    title = f"Bone age: {', '.join(config.model_dirs)} on {config.split} ({values['n']} images)"
    report.write_outputs(
        output,
        values,
        headline.ids,
        headline.male,
        headline.boneage,
        headline.predicted,
        title=title,
        spread=headline.spread,
        interval=None if interval is None else (interval.low, interval.high),
        extra_html=section,
    )
    return values
