"""Real-data benchmark: convert, train within a wall-time budget, evaluate; optionally vs the seed.

    python -m tools.benchmark_real --labels CSV --images DIR --output DIR [--minutes 60]
        [--flagfile configs/rsna_cpu.flags] [--json PATH] [--seed 0] [--image_size S]
        [--data_image_size S] [--data DIR] [--skip_convert] [--eval_every N]
        [--crop hand [--crop_margin 1.15]]
        [--test_labels CSV --test_images DIR] [--compare_seed [--seed_images FULLSIZE_DIR]]
        [--allow_load]

It refuses to start (exit 2) when the 1-minute load average is above 0.5: other work would
skew every time it reports. --allow_load runs anyway and sets "load_flagged" in the JSON.

Every step runs the project's command-line tools as subprocesses, one at a time, with the
commands recorded in the JSON:
  1. `boneage_tpu.convert` (val fraction 0.1, --crop, --data_image_size: by default 1.25x
     the training size) of --images into OUTPUT/data, or --data; a folder whose manifest
     already matches the inputs and options is reused. With --seed_images, of that folder
     instead, always afresh into OUTPUT/data-seed-images.
  2. `boneage_tpu.train --flagfile F ... --max_train_minutes M` into OUTPUT/model-seed<N>:
     the trainer stops at the first loop end after M minutes of its wall time (validation
     and checkpoints included) and fits its cosine's end to the budget. `train_minutes` is
     the trainer's own figure (DONE's `train_minutes`: what the budget counts). The curve and
     `train_img_s` use the records of the model directory's metrics.jsonl, timestamped by the
     trainer (`model_dir.read_metrics`): from its start record to its last train record, minus
     the validation passes (the time between a train record and the val record after it);
     `train_img_s` = images trained / that time.
  3. `boneage_tpu.evaluate` on val: plain, with rotflip TTA, and the bias-corrected MAE when
     the model has a fitted correction (metrics.json `mae_corrected_months`); the plain MAE
     is then `mae_uncorrected_months`, the network's own predictions.
  4. Export-window robustness: the val images (the converter's val ids) decoded from the
     source files, transformed (contrast x0.5 about the image mean; gamma 0.7; gamma 1.4; the
     1st-99th percentile range mapped linearly to 20-100), written as grey PNGs, converted with
     `--split_name val` (and the training data's crop) and evaluated plainly; each MAE and
     its ratio to the plain val MAE.
  5. --test_labels/--test_images: converted with `--split_name test` and evaluated.
  6. --compare_seed: `tools.benchmark_real_seed` trains the same model (built from the same
     flagfile and overrides) the seed's way (tf_keras ImageDataGenerator.flow_from_dataframe
     over the source images of our conversion, one reading thread, + model.fit) for the same
     budget, with the recipe's augmentation ranges translated into ImageDataGenerator's
     arguments (what it cannot do is listed) and the recipe's batch-norm recalibration (both
     sides or neither). Both validation curves (minutes of training, MAE), both final MAEs,
     each side's time to reach the other's final MAE, and `time_to_seed_final_ratio` = our
     time to the seed's final MAE / the seed's time to it (`compare_curves`).
     --seed_images FULLSIZE_DIR (a Kaggle-layout folder of full-size PNGs of the --labels
     ids, e.g. from `tools.make_fullsize_copy`) makes it the input of both sides: the seed
     reads its PNGs, ours converts them (step 1) with its clock started before the
     conversion, so the conversion's minutes count in our curve's times and in our budget
     (the trainer gets --minutes minus them).
Prints and writes (--json, default OUTPUT/benchmark_real.json) one JSON object.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# Quiets TensorFlow's C++ start-up logging here and in the subprocesses (which inherit it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from boneage_tpu import cli  # noqa: E402
from boneage_tpu.cli import option  # noqa: E402
from boneage_tpu.core.errors import Error, UsageError  # noqa: E402
from boneage_tpu.data import crop as crop_lib  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_FLAGFILE = "configs/rsna_cpu.flags"
VAL_FRACTION = 0.1
ROBUSTNESS_TARGET = 1.15  # the bar: each shifted MAE <= 1.15 x the plain val MAE
CURVE_POINTS = 10  # validations per run when --eval_every is derived from --train_steps
INTERVAL = 0.9  # the conformal intervals' level evaluated when the run fitted them
TTA = "rotflip"  # Deeplasia's views: -10, -5, 0, 5, 10 degrees x flip
LOAD_LIMIT = 0.5  # the 1-minute load average above which timings are refused (--allow_load)
# The recipes store images 1.25x their training size (160 px for 128): the zoom and rotation
# augmentation then resamples real pixels rather than upsampling.
STORE_MARGIN = 1.25
NO_CROP = ("none", 0.0)  # (crop, margin) as schema.manifest_crop gives it for uncropped data


class BenchError(Error):
    """A one-line problem with the benchmark's inputs or with a step it ran."""


# ---------------------------------------------------------------------------------------------
# Export-window transforms (numpy, on the decoded source image).


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def contrast_half(image: np.ndarray) -> np.ndarray:
    """Halves the contrast about the image mean: mean + 0.5 (x - mean)."""
    x = image.astype(np.float64)
    return _to_uint8(x.mean() + 0.5 * (x - x.mean()))


def gamma(image: np.ndarray, exponent: float) -> np.ndarray:
    """Applies 255 (x / 255) ** exponent (< 1 brightens the mid-tones, > 1 darkens them)."""
    return _to_uint8(255.0 * (image.astype(np.float64) / 255.0) ** exponent)


def window_20_100(image: np.ndarray) -> np.ndarray:
    """Maps the 1st..99th percentile range linearly to 20..100 (outside values follow, clipped).

    This mimics the narrow export window of the other real RSNA set in the issue (std ~20,
    99th percentile ~100).
    """
    x = image.astype(np.float64)
    low, high = np.percentile(x, [1.0, 99.0])
    if high <= low:
        return _to_uint8(np.full_like(x, 20.0))
    return _to_uint8(20.0 + (x - low) * (80.0 / (high - low)))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "contrast_x0.5": contrast_half,
    "gamma_0.7": lambda image: gamma(image, 0.7),
    "gamma_1.4": lambda image: gamma(image, 1.4),
    "window_p1_p99_to_20_100": window_20_100,
}


# ---------------------------------------------------------------------------------------------
# Flagfile, curves and the trainer's records (pure Python: unit-tested without subprocesses).


def recipe_flags(path: str) -> flags.FlagValues:
    """Returns the recipe flagfile as the trainer reads it: parsed by the trainer's own flags.

    A flag the file leaves out has the trainer's default, so `recipe_flags(F)["image_size"].value`
    is the size a `--flagfile F` run trains at.

    Raises:
      BenchError: the file is missing, or a line is not one of the trainer's flags or values.
    """
    from boneage_tpu.core.config import TrainConfig

    if not os.path.isfile(path):
        raise BenchError(f"flagfile {path} not found (the recipe; pass --flagfile)")
    values = flags.FlagValues()
    cli.define_flags(TrainConfig, values)
    try:
        values(["benchmark_real", "--flagfile", path])  # absl reads the file's lines as flags.
    except flags.Error as e:
        raise BenchError(f"flagfile {path}: {' '.join(str(e).split())}") from None
    return values


def time_to_reach(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """Returns the first curve time (minutes) whose MAE is <= target, or None."""
    for minutes, mae in curve:
        if mae <= target:
            return float(minutes)
    return None


def compare_curves(
    ours: Sequence[Sequence[float]], seed: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """Time to accuracy, final against final: each side's time to reach the other's final MAE.

    Both curves are [minutes, val MAE] in time order; a side's last point is its final MAE.
    Every time is that of a side's first validation at or below a target (no interpolation: a
    validation only shows the MAE where it ran, so each errs late by the same grain). The
    ratio divides our time to the seed's final MAE by the seed's own time to it, measured the
    same way (`seed_minutes`: its first validation at or below its final MAE, which may come
    before its last); `seed_time_to_ours_final_ratio` is the mirror.

    Returns:
      {"ours_final_mae_months", "seed_final_mae_months", "ours_train_minutes",
      "seed_train_minutes" (the last points' times), "ours_minutes", "seed_minutes" (each
      side's time to its own final MAE), "ours_minutes_to_seed_final",
      "seed_minutes_to_ours_final" (None: never reached), "time_to_seed_final_ratio",
      "seed_time_to_ours_final_ratio" (None with a "reason")}.
    """
    if not seed or not ours:
        return {
            "time_to_seed_final_ratio": None,
            "seed_time_to_ours_final_ratio": None,
            "reason": "a curve is empty",
        }
    ours_final, seed_final = float(ours[-1][1]), float(seed[-1][1])
    result: dict[str, Any] = {
        "ours_final_mae_months": ours_final,
        "seed_final_mae_months": seed_final,
        "ours_train_minutes": float(ours[-1][0]),
        "seed_train_minutes": float(seed[-1][0]),
        "ours_minutes": time_to_reach(ours, ours_final),
        "seed_minutes": time_to_reach(seed, seed_final),
        "ours_minutes_to_seed_final": time_to_reach(ours, seed_final),
        "seed_minutes_to_ours_final": time_to_reach(seed, ours_final),
    }
    reasons = []
    for side, other, base, name in (
        ("ours", "seed", "seed", "time_to_seed_final_ratio"),
        ("seed", "ours", "ours", "seed_time_to_ours_final_ratio"),
    ):
        reached, own = result[f"{side}_minutes_to_{other}_final"], result[f"{base}_minutes"]
        result[name] = None
        if reached is None:
            best = min(mae for _, mae in (ours if side == "ours" else seed))
            target = result[f"{other}_final_mae_months"]
            who = "our trainer" if side == "ours" else "the seed's pipeline"
            whose = "the seed's" if side == "ours" else "our"
            reasons.append(
                f"{who} never reached {whose} final val MAE {target:.2f} (its best was {best:.2f})"
            )
        elif own <= 0:
            reasons.append(f"the {base} side's time to its final MAE is 0")
        else:
            result[name] = reached / own
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result


def shift_curve(curve: Sequence[Sequence[float]], minutes: float) -> list[list[float]]:
    """Returns the curve with `minutes` added to every time (our clock started before them)."""
    return [[float(t) + minutes, float(mae)] for t, mae in curve]


def check_load(allow: bool, limit: float = LOAD_LIMIT) -> tuple[list[float], bool]:
    """Reads the load averages before the benchmark; refuses a busy machine unless allowed.

    Args:
      allow: --allow_load: run anyway, flagged.
      limit: the highest 1-minute load average the timings are trusted at.

    Returns:
      (the 1, 5 and 15-minute load averages, whether the 1-minute one is above `limit`).

    Raises:
      UsageError: the 1-minute load average is above `limit` and `allow` is False.
    """
    load = [round(x, 2) for x in os.getloadavg()]
    busy = load[0] > limit
    if busy and not allow:
        raise UsageError(
            f"the 1-minute load average is {load[0]:g} (> {limit:g}): other work would skew "
            "the timings; wait for an idle machine or pass --allow_load (the JSON is flagged)"
        )
    return load, busy


def summarize_training(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Reads the trainer's metrics.jsonl records into its curve and throughput.

    Args:
      records: the records in order, as `model_dir.read_metrics` returns them; only the last
        process's (from its last start record) count, its "seconds" being from that start.

    Returns:
      {"batch_size", "start_step", "train_steps", "final_step", "train_seconds" (start record
      to last train record, validations excluded), "wall_seconds" (start record to last train
      record), "images_per_second", "logged_img_s_median" (the trainer's own per-loop figures
      after the first loop, which includes tracing), "curve" [[minutes, val MAE], ...],
      "stopped_on_time_budget", "budget_stop_minutes" (the trainer's figure in its stop
      record, None without one)}.
    """
    starts = [i for i, record in enumerate(records) if record["kind"] == "start"]
    run = records[starts[-1] :] if starts else []
    if not any(record["kind"] == "train" for record in run):
        raise BenchError(
            "the trainer wrote no start or train records to metrics.jsonl: see its log"
        )
    start = run[0]
    info: dict[str, Any] = {"curve": [], "stopped_on_time_budget": False, "final_step": None}
    info["budget_stop_minutes"] = None
    info["batch_size"], info["train_steps"] = int(start["batch_size"]), int(start["train_steps"])
    info["start_step"] = int(start["step"])
    excluded = 0.0
    last_step_time = None
    rates: list[float] = []
    train_seconds = wall_seconds = 0.0
    for record in run[1:]:
        seconds = float(record["seconds"]) - float(start["seconds"])
        if record["kind"] == "train":
            last_step_time = seconds
            train_seconds, wall_seconds = seconds - excluded, seconds
            info["final_step"] = int(record["step"])
            rates.append(float(record["images_per_second"]))
        elif record["kind"] == "val" and last_step_time is not None:
            excluded += seconds - last_step_time
            last_step_time = seconds
            info["curve"].append([train_seconds / 60.0, float(record["mae_months"])])
        elif record["kind"] == "stop" and record.get("reason") == "time_budget":
            info["stopped_on_time_budget"] = True
            info["budget_stop_minutes"] = float(record["minutes"])
    info["train_seconds"], info["wall_seconds"] = train_seconds, wall_seconds
    done = (info["final_step"] - info["start_step"]) * info["batch_size"]
    info["images_per_second"] = done / train_seconds if train_seconds > 0 else None
    steady = rates[1:] or rates
    info["logged_img_s_median"] = float(np.median(steady)) if steady else None
    return info


# ---------------------------------------------------------------------------------------------
# Subprocesses and data folders.


def read_training(model_dir: pathlib.Path) -> dict[str, Any]:
    """`summarize_training` of the model directory's metrics.jsonl; BenchError when unreadable."""
    from boneage_tpu.core import model_dir as model_dir_lib

    try:
        return summarize_training(model_dir_lib.read_metrics(str(model_dir)))
    except model_dir_lib.ModelDirError as e:
        raise BenchError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        # A record without a figure the trainer always writes: another trainer's file.
        path = model_dir_lib.metrics_path(str(model_dir))
        raise BenchError(f"{path}: a record has no usable {e}: see the trainer's log") from None


def read_manifest(data_dir: pathlib.Path) -> dict[str, Any]:
    """The data folder's manifest through `schema.read_manifest`; BenchError when unusable."""
    from boneage_tpu.core import schema

    try:
        return schema.read_manifest(str(data_dir))
    except schema.ManifestError as e:
        raise BenchError(str(e)) from None


def has_manifest(data_dir: pathlib.Path) -> bool:
    """Whether the folder holds a manifest (a conversion finished there)."""
    from boneage_tpu.core import schema

    return (data_dir / schema.MANIFEST_NAME).is_file()


def run_command(
    args: Sequence[str], log_path: pathlib.Path, commands: list[str]
) -> list[tuple[float, str]]:
    """Runs `python -m ...` args, echoing and logging its output; returns timestamped lines.

    Raises BenchError naming the log and the last output line when the command fails.
    """
    cmd = [sys.executable, *args]
    commands.append(shlex.join(["python", *args]))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    lines: list[tuple[float, str]] = []
    print(f"$ {commands[-1]}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {commands[-1]}\n")
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
        )
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
            log.write(line)
            log.flush()
            print(f"  {line}", end="", flush=True)
        status = process.wait()
    if status:
        texts = [t for _, t in lines if t.strip()]
        last = texts[-1].strip() if texts else "no output"
        raise BenchError(f"{args[1]} failed (exit {status}): {last} (log: {log_path})")
    return lines


def manifest_matches(
    data_dir: pathlib.Path,
    labels: str,
    image_size: int,
    split_name: str,
    crop: tuple[str, float] = NO_CROP,
) -> bool:
    """Whether data_dir holds a finished conversion of `labels` with these options."""
    import hashlib

    from boneage_tpu.core import schema

    if not has_manifest(data_dir):
        return False
    manifest = read_manifest(data_dir)
    options = manifest.get("options", {})
    with open(labels, "rb") as f:
        csv_sha = hashlib.sha256(f.read()).hexdigest()
    wanted = {"image_size": image_size, "split_name": split_name}
    if not split_name:
        wanted["val_fraction"] = VAL_FRACTION
    return (
        manifest.get("source_csv_sha256") == csv_sha
        and all(options.get(k) == v for k, v in wanted.items())
        and schema.same_crop(schema.manifest_crop(manifest), crop)
    )


def convert(
    labels: str,
    images: str,
    output: pathlib.Path,
    image_size: int,
    logs: pathlib.Path,
    commands: list[str],
    split_name: str = "",
    log_name: str = "data",
    crop: tuple[str, float] = NO_CROP,
) -> float:
    """Converts (or reuses a matching conversion); returns the conversion's wall minutes (0 reused).

    `crop` is (crop, margin) as `schema.manifest_crop` returns it: the shifted and test sets
    are cropped as the training data was, or evaluate refuses them.
    """
    if manifest_matches(output, labels, image_size, split_name, crop):
        print(f"reusing the conversion in {output} (its manifest matches)", flush=True)
        return 0.0
    args = ["-m", "boneage_tpu.convert", "--labels", labels, "--images", images]
    args += ["--output", str(output), "--image_size", str(image_size), "--quiet"]
    if crop[0] != "none":
        args += ["--crop", crop[0], "--crop_margin", f"{crop[1]:g}"]
    args += ["--split_name", split_name] if split_name else ["--val_fraction", str(VAL_FRACTION)]
    began = time.monotonic()
    run_command(args, logs / f"convert-{log_name}.log", commands)
    return (time.monotonic() - began) / 60.0


def split_records(data_dir: pathlib.Path, split: str) -> list[tuple[str, float, bool]]:
    """Returns (id, boneage, male) of every record of a split, read through `schema`."""
    import tensorflow as tf

    from boneage_tpu.core import schema

    manifest = schema.read_manifest(str(data_dir))
    dataset = tf.data.TFRecordDataset(schema.shard_paths(str(data_dir), manifest, split))
    rows = []
    for serialized in dataset.batch(256):
        features = schema.parse_examples(serialized)
        ids = features["id"].numpy()
        for i in range(len(ids)):
            rows.append(
                (
                    ids[i].decode("utf-8"),
                    float(features["boneage"][i]),
                    bool(features["male"][i]),
                )
            )
    return rows


def image_paths(images_dir: str, ids: Sequence[str]) -> dict[str, str]:
    """Maps each id to its single source image under images_dir (one-line error otherwise)."""
    from boneage_tpu.data import layouts

    found = layouts.find_images(images_dir)
    missing = [i for i in ids if len(found.get(i, [])) != 1]
    if missing:
        raise BenchError(
            f"{len(missing)} val/train ids have no single image in {images_dir}, e.g. {missing[:3]}"
        )
    return {i: found[i][0] for i in ids}


def write_labels_csv(path: pathlib.Path, rows: Sequence[tuple[str, float, bool]]) -> None:
    """Writes a Kaggle-layout labels CSV (id,boneage,male)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "boneage", "male"])
        for image_id, age, male in rows:
            writer.writerow([image_id, f"{age:g}", "True" if male else "False"])


def write_transformed(
    rows: Sequence[tuple[str, float, bool]], paths: dict[str, str], folder: pathlib.Path, name: str
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes the transformed val images as grey PNGs + their CSV; returns (csv, images dir)."""
    from PIL import Image

    from boneage_tpu.data import images

    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id, _, _ in rows:
        target = image_dir / f"{image_id}.png"
        if not target.exists():
            pixels = TRANSFORMS[name](images.read_grayscale(paths[image_id]))
            Image.fromarray(pixels, mode="L").save(target)
    labels = folder / "labels.csv"
    write_labels_csv(labels, rows)
    return labels, image_dir


def evaluate(
    model_dir: pathlib.Path | Sequence[pathlib.Path],
    data_dir: pathlib.Path,
    split: str,
    tta: str,
    output: pathlib.Path,
    commands: list[str],
    interval: float = 0.0,
) -> dict[str, Any]:
    """Runs boneage_tpu.evaluate into `output` (its log beside it); returns its metrics.json.

    Several model directories are evaluated as their ensemble; `interval` > 0 asks for the
    conformal intervals at that level (metrics.json "interval").
    """
    model_dirs = [model_dir] if isinstance(model_dir, pathlib.Path) else list(model_dir)
    args = ["-m", "boneage_tpu.evaluate"]
    for path in model_dirs:
        args += ["--model_dir", str(path)]
    args += ["--data", str(data_dir)]
    args += ["--split", split, "--tta", tta, "--output", str(output)]
    if interval:
        args += ["--interval", f"{interval:g}"]
    run_command(args, output.parent / f"{output.name}.log", commands)
    return json.loads((output / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------
# The benchmark.


def evaluate_test_set(
    model_dir: pathlib.Path,
    test_dir: pathlib.Path,
    evals: pathlib.Path,
    commands: list[str],
    level: float,
) -> dict[str, Any]:
    """Evaluates a converted test set plainly and with TTA; returns the JSON's test_* keys.

    `test_skipped` is the number of CSV rows the conversion skipped (its manifest lists them):
    the MAEs are over the rest.
    """
    test = evaluate(model_dir, test_dir, "test", "none", evals / "test", commands, level)
    test_tta = evaluate(model_dir, test_dir, "test", TTA, evals / f"test-{TTA}", commands)
    return {
        "test_mae_months": plain_mae(test),
        "test_mae_tta_months": plain_mae(test_tta),
        "test_mae_corrected_months": test.get("mae_corrected_months"),
        "test_mean_predictor_mae_months": test["mean_predictor_mae_months"],
        "test_n": test["n"],
        "test_skipped": int(read_manifest(test_dir).get("rows_skipped", 0)),
        "test_tta_views": test_tta.get("tta_views"),
        "interval_test": test.get("interval"),
    }


def evaluate_existing(
    config: BenchConfig, out: pathlib.Path, commands: list[str], notes: list[str]
) -> dict[str, Any]:
    """--model_dir: converts the test set as the run's data was stored and evaluates it."""
    from boneage_tpu.core import model_dir as model_dir_lib

    model_dir = pathlib.Path(config.model_dir).resolve()
    try:
        derived = model_dir_lib.load_derived(str(model_dir))
    except model_dir_lib.ModelDirError as e:
        raise BenchError(str(e)) from None
    if not derived.data_image_size:
        raise BenchError(f"{model_dir}: derived.json does not say the data's stored size")
    test_dir = out / "test-data"
    convert(
        config.test_labels, config.test_images, test_dir, derived.data_image_size, out / "logs",
        commands, "test", "test", (derived.data_crop, derived.data_crop_margin),
    )  # fmt: skip
    # Into OUTPUT, not the run's folder: evaluating must not write into the model directory.
    result = evaluate_test_set(
        model_dir, test_dir, out / "eval", commands, interval_level(model_dir)
    )
    notes.append(f"--model_dir: {model_dir} evaluated as trained, no conversion or training")
    result.update(
        model_dir=str(model_dir),
        data_image_size=derived.data_image_size,
        notes=notes,
        commands=commands,
    )
    return result


def interval_level(model_dir: pathlib.Path) -> float:
    """INTERVAL when the run stored conformal scores for plain predictions (else 0: none)."""
    from boneage_tpu.core import model_dir as model_dir_lib  # TensorFlow: only when used

    derived = model_dir_lib.load_derived(str(model_dir))
    return INTERVAL if derived.intervals("none", "absolute") is not None else 0.0


def interval_check(model_dir: pathlib.Path) -> dict[str, Any] | None:
    """The trainer's held-out coverage check of its intervals (DONE's interval_check), or None."""
    from boneage_tpu.core import model_dir as model_dir_lib

    done = model_dir_lib.read_done(str(model_dir)) or {}
    return (done.get("metrics") or {}).get("interval_check")


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def plain_mae(metrics: dict[str, Any]) -> float | None:
    """The MAE of the network's own predictions: without a fitted bias correction.

    A model with a fitted correction applies it itself, and evaluate then reports
    `mae_months` corrected and `mae_uncorrected_months` beside it.
    """
    uncorrected = metrics.get("mae_uncorrected_months")
    return uncorrected if uncorrected is not None else metrics["mae_months"]


def read_done(model_dir: pathlib.Path) -> dict[str, Any] | None:
    """The trainer's DONE marker through `model_dir.read_done` (None: not finished)."""
    from boneage_tpu.core import model_dir as model_dir_lib

    try:
        return model_dir_lib.read_done(str(model_dir))
    except model_dir_lib.ModelDirError as e:
        raise BenchError(str(e)) from None


def trainer_minutes(model_dir: pathlib.Path) -> float | None:
    """The trainer's own training-time figure (DONE's metrics.train_minutes), when it has one."""
    done = read_done(model_dir)
    if done is None:
        return None
    value = done.get("metrics", {}).get("train_minutes")
    return float(value) if value is not None else None


@dataclasses.dataclass
class BenchConfig:
    """The benchmark's settings (its flags; --flagfile is taken out of the command line first)."""

    labels: str = option("", "Labels CSV of the training data (not with --model_dir).")
    images: str = option("", "Folder of its images (searched recursively).")
    output: str = option("", "Work folder: data, model, evaluations, logs.", required=True)
    minutes: float = option(
        60.0, "Training wall-time budget in minutes (--max_train_minutes).", min=0, max=10**6
    )
    json: str = option("", "JSON output (default OUTPUT/benchmark_real.json).")
    seed: int = option(0, "Training seed.", min=0, max=2**31 - 1)
    image_size: int = option(0, "Training size (0: the flagfile's).", min=0, max=4096)
    data_image_size: int = option(
        0,
        f"Conversion size (0: {STORE_MARGIN:g} x the training size, as the recipes' data: "
        "160 px for 128, 200 px for 160).",
        min=0,
        max=4096,
    )
    data: str = option("", "Converted data folder (default OUTPUT/data).")
    crop: str = option(
        "none",
        "The conversion's crop (boneage_tpu.convert --crop): none | hand.",
        choices=crop_lib.CROPS,
    )
    crop_margin: float = option(
        crop_lib.DEFAULT_MARGIN,
        "With --crop hand: the hand box's enlargement (--crop_margin).",
        min=1.0,
        max=4.0,
    )
    skip_convert: bool = option(False, "Use --data (or OUTPUT/data) as it is.")
    eval_every: int = option(
        0,
        "Validation interval in steps (0: the flagfile's; with --compare_seed and none there, "
        f"--train_steps / {CURVE_POINTS}).",
        min=0,
        max=10**9,
    )
    model_dir: str = option(
        "",
        "Evaluate this trained run on --test_labels/--test_images instead of converting and "
        "training (no --labels/--images).",
    )
    test_labels: str = option("", "Held-out labelled CSV to evaluate too.")
    test_images: str = option("", "Images of --test_labels.")
    compare_seed: bool = option(False, "Also train the seed's way and compare time to accuracy.")
    seed_images: str = option(
        "",
        "With --compare_seed: a Kaggle-layout folder of full-size PNGs of the --labels ids "
        "(tools.make_fullsize_copy makes one), the input of both sides: the seed reads them, "
        "ours converts them inside its clock and budget.",
    )
    allow_load: bool = option(
        False, f"Run even when the 1-minute load average is above {LOAD_LIMIT:g} (flagged)."
    )
    # Not a flag: absl would expand --flagfile into this command's own flags (see main).
    flagfile: str = DEFAULT_FLAGFILE


def run(config: BenchConfig) -> dict[str, Any]:
    """Runs the benchmark with checked settings (see `check_config`); returns the JSON object."""
    from boneage_tpu.core import schema

    out = pathlib.Path(config.output).resolve()
    logs = out / "logs"
    commands: list[str] = []
    notes: list[str] = []
    load_before, load_flagged = check_load(config.allow_load)
    if config.model_dir:
        result = evaluate_existing(config, out, commands, notes)
        result["load_average"] = {"before": load_before, "after": list(os.getloadavg())}
        result["load_flagged"] = load_flagged
        return result
    recipe_values = recipe_flags(config.flagfile)
    # With --seed_images both sides train from the full-size PNGs: the seed reads them, ours
    # converts them (timed, into a fresh folder) and trains on the conversion.
    images = config.seed_images or config.images
    image_size = config.image_size or recipe_values["image_size"].value
    data_image_size = config.data_image_size or round(image_size * STORE_MARGIN)
    model_dir = out / f"model-seed{config.seed}"
    if model_dir.exists() and any(model_dir.iterdir()):
        raise BenchError(f"{model_dir} exists: remove it or use another --output (no resuming)")
    data_dir = pathlib.Path(config.data).resolve() if config.data else out / "data"
    if config.seed_images:
        data_dir = out / "data-seed-images"
        if data_dir.exists() and any(data_dir.iterdir()):
            raise BenchError(
                f"{data_dir} exists: remove it (with --seed_images our side's time includes "
                "its conversion, so it is not reused)"
            )
    convert_minutes: float | None = None
    given = bool(config.data) and has_manifest(data_dir)
    if config.skip_convert or given:
        if not has_manifest(data_dir):
            raise BenchError(f"--skip_convert: {data_dir} has no manifest.json")
        notes.append(f"data used as converted: {data_dir} (conversion time not measured)")
    else:
        convert_minutes = convert(
            config.labels, images, data_dir, data_image_size, logs, commands,
            crop=(config.crop, config.crop_margin if config.crop != "none" else 0.0),
        )  # fmt: skip
    # Shifted and test sets are stored (and cropped) like the training data, so that only the
    # shift differs.
    stored_size = int(read_manifest(data_dir)["image_size"])
    stored_crop = schema.manifest_crop(read_manifest(data_dir))
    if config.crop != "none" and not schema.same_crop(
        stored_crop, (config.crop, config.crop_margin)
    ):
        raise BenchError(
            f"--crop {config.crop}: {data_dir} was converted with {schema.crop_flags(*stored_crop)}"
        )

    # The same recipe for our trainer and the seed pipeline: flagfile, then these overrides.
    recipe = ["--flagfile", config.flagfile, "--data", str(data_dir)]
    recipe += ["--seed", str(config.seed), "--max_train_minutes", f"{config.minutes:g}"]
    train_budget = config.minutes
    if config.seed_images:
        # One budget of wall time for both sides, from each side's clock start: ours started
        # before its conversion, so the trainer gets what the conversion left.
        assert convert_minutes is not None
        train_budget = config.minutes - convert_minutes
        if train_budget <= 0:
            raise BenchError(
                f"the conversion of --seed_images took {convert_minutes:.1f} min of the "
                f"{config.minutes:g}-minute budget: raise --minutes"
            )
    if config.image_size:
        recipe += ["--image_size", str(image_size)]
    eval_every = config.eval_every
    if not eval_every and config.compare_seed:
        eval_every = recipe_values["eval_every"].value or max(
            1, recipe_values["train_steps"].value // CURVE_POINTS
        )
    if eval_every:
        recipe += ["--eval_every", str(eval_every)]
    train_args = ["-m", "boneage_tpu.train", *recipe, "--model_dir", str(model_dir)]
    if train_budget != config.minutes:
        train_args += ["--max_train_minutes", f"{train_budget:g}"]  # the last value counts
    run_command(train_args, logs / f"train-seed{config.seed}.log", commands)
    train_log = read_training(model_dir)
    if train_log["stopped_on_time_budget"]:
        notes.append(
            f"training stopped on the {train_budget:g}-minute budget at step "
            f"{train_log['final_step']} of {train_log['train_steps']} (the trainer fits its "
            "cosine's end to the budget after every loop)"
        )
    else:
        notes.append(
            f"training reached --train_steps {train_log['train_steps']} within the "
            f"{train_budget:g}-minute budget: the budget did not bind"
        )
    own_minutes = trainer_minutes(model_dir)
    if own_minutes is None:
        notes.append(
            "DONE has no train_minutes: train_minutes is metrics.jsonl's start-to-last-train"
        )

    evals = model_dir / "eval"
    level = interval_level(model_dir)
    plain = evaluate(model_dir, data_dir, "val", "none", evals / "val", commands, level)
    with_tta = evaluate(model_dir, data_dir, "val", TTA, evals / f"val-{TTA}", commands)
    corrected = plain.get("mae_corrected_months")
    if corrected is None:
        notes.append("metrics.json has no mae_corrected_months (no fitted bias correction): null")
    else:
        notes.append(
            "the model applies its fitted bias correction: val_mae_months is evaluate's "
            "mae_uncorrected_months; mae_by_sex is of the "
            + ("uncorrected" if plain.get("in_sample") else "corrected")
            + " predictions (evaluate's headline)"
        )

    val_rows = split_records(data_dir, "val")
    paths = image_paths(config.images, [r[0] for r in val_rows])
    robustness = {}
    for name in TRANSFORMS:
        folder = out / "robustness" / name
        labels, images_dir = write_transformed(val_rows, paths, folder, name)
        shifted = folder / "data"
        convert(
            str(labels), str(images_dir), shifted, stored_size, logs, commands, "val", name,
            stored_crop,
        )  # fmt: skip
        values = evaluate(model_dir, shifted, "val", "none", evals / f"val-{name}", commands, level)
        ratio = _ratio(plain_mae(values), plain_mae(plain))
        robustness[name] = {
            "mae_months": plain_mae(values),
            "mae_corrected_months": values.get("mae_corrected_months"),
            "ratio": ratio,
            "within_target": ratio is not None and ratio <= ROBUSTNESS_TARGET,
            "interval": values.get("interval"),
        }

    result: dict[str, Any] = {
        "val_mae_months": plain_mae(plain),
        "val_mae_tta_months": plain_mae(with_tta),
        "tta": TTA,
        "val_mae_corrected_months": corrected,
        "val_mae_tta_corrected_months": with_tta.get("mae_corrected_months"),
        "bias_correction": plain.get("bias_correction"),
        "mean_predictor_mae_months": plain["mean_predictor_mae_months"],
        "mae_by_sex": plain["mae_by_sex"],
        "n_val": plain["n"],
        "train_minutes": (
            own_minutes if own_minutes is not None else train_log["wall_seconds"] / 60.0
        ),
        "train_minutes_method": (
            "the trainer's wall time from its first to its last loop, validation and "
            "checkpoints included (DONE's train_minutes; what --max_train_minutes counts)"
        ),
        "train_minutes_excluding_validation": train_log["train_seconds"] / 60.0,
        "train_img_s": train_log["images_per_second"],
        "train_img_s_method": (
            "(final step - start step) x batch / training wall time; the time is taken from the "
            "trainer's metrics.jsonl records: its start record to its last train record, "
            "validation passes excluded (first loop, with tracing, included)"
        ),
        "train_img_s_logged_median": train_log["logged_img_s_median"],
        "train_steps_done": train_log["final_step"],
        "train_steps_planned": train_log["train_steps"],
        "stopped_on_time_budget": train_log["stopped_on_time_budget"],
        "budget_minutes": config.minutes,
        "train_budget_minutes": train_budget,
        "seed_images": config.seed_images or None,
        "image_size": image_size,
        "data_image_size": stored_size,
        "data_crop": schema.crop_flags(*stored_crop),
        "flagfile": config.flagfile,
        "seed": config.seed,
        "model_dir": str(model_dir),
        "data": str(data_dir),
        "convert_minutes": convert_minutes,
        "robustness": robustness,
        "robustness_target_ratio": ROBUSTNESS_TARGET,
        # val's coverage is in-sample (the scores were fitted on it); the trainer's held-out
        # check (fit on half of val, cover the other) and the shift sets' are not.
        "interval_val": plain.get("interval"),
        "interval_check": interval_check(model_dir),
        "val_curve": train_log["curve"],
        "cores": os.cpu_count() or 1,
    }
    if config.test_labels:
        test_dir = out / "test-data"
        convert(
            config.test_labels, config.test_images, test_dir, stored_size, logs, commands,
            "test", "test", stored_crop,
        )  # fmt: skip
        result.update(evaluate_test_set(model_dir, test_dir, evals, commands, level))
    if config.compare_seed:
        result["seed_comparison"] = _compare_seed(
            config, images, out, data_dir, recipe, eval_every, train_log, convert_minutes,
            commands,
        )  # fmt: skip
    if config.seed_images:
        notes.append(
            f"--seed_images: both sides trained from {config.seed_images}; our conversion "
            f"({convert_minutes:.2f} min) counts in our curve's times and in our side's "
            f"{config.minutes:g}-minute budget; the export-window robustness sets are made from "
            "--images"
        )
    result["notes"] = notes
    result["commands"] = commands
    result["load_average"] = {
        "before": load_before,
        "after": [round(x, 2) for x in os.getloadavg()],
    }
    result["load_flagged"] = load_flagged
    return result


def _compare_seed(
    config: BenchConfig,
    images: str,
    out: pathlib.Path,
    data_dir: pathlib.Path,
    recipe: Sequence[str],
    eval_every: int,
    train_log: dict[str, Any],
    convert_minutes: float | None,
    commands: list[str],
) -> dict[str, Any]:
    """Trains the seed's way on the same split, then compares the two validation curves.

    Args:
      config: the benchmark's settings.
      images: the folder the seed side reads (the source images of our conversion).
      out: the work folder.
      data_dir: our conversion (its train and val ids are the seed's split).
      recipe: the flagfile and overrides both sides train with.
      eval_every: the validation interval of both sides.
      train_log: `read_training` of our run.
      convert_minutes: our conversion's minutes (None or 0: not measured or reused).
      commands: the commands run so far (appended to).
    """
    folder = out / f"seed-pipeline-seed{config.seed}"
    csvs = write_seed_csvs(data_dir, images, folder)
    curve_path = folder / "curve.json"
    args = ["-m", "tools.benchmark_real_seed", *recipe, "--model_dir", str(folder / "model")]
    args += ["--train_csv", str(csvs["train"]), "--val_csv", str(csvs["val"])]
    args += ["--curve", str(curve_path)]
    if "--eval_every" not in recipe:
        args += ["--eval_every", str(eval_every)]
    run_command(args, out / "logs" / f"seed-pipeline-seed{config.seed}.log", commands)
    seed = json.loads(curve_path.read_text())
    # With --seed_images our clock started before the conversion: our curve's times include it.
    converted_in_clock = bool(config.seed_images)
    ours = train_log["curve"]
    if converted_in_clock:
        ours = shift_curve(ours, convert_minutes or 0.0)
    comparison = compare_curves(ours, seed["curve"])
    reached, seed_minutes = (
        comparison.get("ours_minutes_to_seed_final"),
        comparison.get("seed_minutes"),
    )
    with_convert = None
    if converted_in_clock:
        with_convert = comparison["time_to_seed_final_ratio"]
    elif reached is not None and convert_minutes and seed_minutes:
        with_convert = (reached + convert_minutes) / seed_minutes
    settings = seed.get("settings", {})
    return {
        "our_curve": ours,
        "our_curve_includes_convert_minutes": converted_in_clock,
        "convert_minutes": convert_minutes,
        "seed_curve": seed["curve"],
        **comparison,
        "time_to_seed_final_ratio_with_convert": with_convert,
        "seed_images": config.seed_images or None,
        "eval_every_steps": eval_every,
        "seed_steps": seed["steps"],
        "seed_img_s": seed["images_per_second"],
        "our_img_s": train_log["images_per_second"],
        "seed_settings": settings,
        "seed_augmentation_untranslated": settings.get("augmentation_untranslated"),
        "bn_recalibration_batches": settings.get("bn_recalibration_batches"),
        "method": (
            "both runs: the same flagfile and overrides (so the same augmentation ranges, as "
            "far as ImageDataGenerator has them, and batch-norm recalibration on both sides or "
            "neither), the same budget of wall time (validation included, as "
            "--max_train_minutes counts it; with --seed_images our conversion counts in ours); "
            "both curves: minutes of training wall time (validation passes excluded; with "
            "--seed_images ours includes the conversion) vs val MAE on the same val ids, every "
            "eval_every_steps steps and at the end; each side's time to the other's final MAE "
            "and to its own is its first validation at or below it; "
            "time_to_seed_final_ratio = ours_minutes_to_seed_final / seed_minutes"
        ),
    }


def write_seed_csvs(
    data_dir: pathlib.Path, images: str, folder: pathlib.Path
) -> dict[str, pathlib.Path]:
    """Writes the seed side's train.csv and val.csv (path,boneage,male) of our split's ids.

    Args:
      data_dir: our conversion, whose train and val ids (`split_records`) are the split.
      images: the folder whose files the paths name (one image per id, `image_paths`).
      folder: where the CSVs go.

    Returns:
      {"train": path, "val": path}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    csvs = {}
    for split in ("train", "val"):
        rows = split_records(data_dir, split)
        paths = image_paths(images, [r[0] for r in rows])
        csvs[split] = folder / f"{split}.csv"
        with open(csvs[split], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "boneage", "male"])
            for image_id, age, male in rows:
                writer.writerow([paths[image_id], f"{age:g}", int(male)])
    return csvs


def split_flagfile(argv: Sequence[str]) -> tuple[list[str], str]:
    """Takes `--flagfile F` out of argv: absl would expand it into this command's own flags.

    Returns:
      (the other arguments, the flagfile; DEFAULT_FLAGFILE when absent).

    Raises:
      UsageError: --flagfile without a value.
    """
    rest, flagfile = [argv[0]], DEFAULT_FLAGFILE
    args = iter(argv[1:])
    for arg in args:
        if arg in ("--flagfile", "-flagfile"):
            flagfile = next(args, "")
            if not flagfile:
                raise UsageError("--flagfile needs a value")
        elif arg.startswith(("--flagfile=", "-flagfile=")):
            flagfile = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, flagfile


def check_config(config: BenchConfig) -> BenchConfig:
    """Returns the config with the flagfile's path resolved; UsageError for what cannot work."""
    if config.minutes <= 0:
        raise UsageError(f"--minutes must be > 0, got {config.minutes:g}")
    if bool(config.test_labels) != bool(config.test_images):
        raise UsageError("--test_labels and --test_images go together")
    if config.crop != "none" and config.compare_seed:
        # The seed's ImageDataGenerator reads the source images whole: the duel would compare
        # two inputs, not two pipelines.
        raise UsageError("--crop hand with --compare_seed: the seed's pipeline does not crop")
    if config.model_dir:
        if not config.test_labels:
            raise UsageError(
                "--model_dir evaluates a trained run: give --test_labels/--test_images"
            )
        if config.labels or config.images or config.compare_seed or config.data:
            raise UsageError(
                "--model_dir evaluates without training: drop --labels/--images/--data/"
                "--compare_seed"
            )
        if not os.path.isdir(config.model_dir):
            raise UsageError(f"--model_dir {config.model_dir} is not a folder")
    elif not (config.labels and config.images):
        raise UsageError("--labels and --images are required (or --model_dir to evaluate a run)")
    if config.seed_images:
        if not config.compare_seed:
            raise UsageError("--seed_images needs --compare_seed (it is the duel's input)")
        if config.skip_convert or config.data:
            raise UsageError(
                "--seed_images converts its own data inside our side's clock: drop "
                "--data/--skip_convert"
            )
    for name in ("labels", "test_labels"):
        value = getattr(config, name)
        if value and not os.path.isfile(value):
            raise UsageError(f"--{name} {value} not found")
    for name in ("images", "test_images", "seed_images"):
        value = getattr(config, name)
        if value and not os.path.isdir(value):
            raise UsageError(f"--{name} {value} is not a folder")
    return dataclasses.replace(config, flagfile=resolve_flagfile(config.flagfile))


def resolve_flagfile(path: str) -> str:
    """The flagfile's absolute path (a relative one also under the repository); UsageError."""
    flagfile = pathlib.Path(path)
    if not flagfile.is_file() and not flagfile.is_absolute() and (REPO_ROOT / flagfile).is_file():
        flagfile = REPO_ROOT / flagfile  # The default recipe, when run from another folder.
    if not flagfile.is_file():
        raise UsageError(f"--flagfile {path} not found")
    return str(flagfile.resolve())


def _job(config: BenchConfig) -> None:
    config = check_config(config)
    result = run(config)
    text = json.dumps(result, indent=2, sort_keys=True, allow_nan=False)
    print(text)
    path = pathlib.Path(config.json or pathlib.Path(config.output) / "benchmark_real.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}", file=sys.stderr)


def main_with_flagfile(
    prog: str, config_cls: type, job: Callable[[Any], None], argv: Sequence[str], doc: str | None
) -> int:
    """`cli.main` for a benchmark whose --flagfile is the trainer's: taken out, set on the config.

    Returns 0 done; 2 a bad command line; 1 a step failed (one `prog: error: ...` line).
    """
    try:
        argv, flagfile = split_flagfile(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    with_flagfile = lambda config: job(dataclasses.replace(config, flagfile=flagfile))  # noqa: E731
    return cli.main(prog, config_cls, with_flagfile, argv, doc)


def main(argv: Sequence[str]) -> int:
    """Runs the benchmark on `argv` (argv[0] is the program); returns the exit status."""
    return main_with_flagfile("benchmark_real", BenchConfig, _job, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
