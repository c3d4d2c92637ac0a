"""Evaluates trained models on a TFRecord split: metrics.json, predictions.csv and a report.

  python -m boneage_tpu.evaluate --model_dir PATH --data PATH [--split val]
      [--checkpoint latest|STEP|export] [--tta none|flip] [--output PATH] [--batch_size B]
      [--continuous [--timeout SECONDS]] [--tpu ...|--virtual_cpus N]

PATHs are local or gs://. Every record of the split is evaluated exactly once. Several
`--model_dir` flags evaluate the ensemble (mean of the members' predictions). `--continuous`
follows a training run and evaluates each new checkpoint once (see `boneage_tpu.evaluate.continuous`).
Outputs go to `--output`, default `MODEL_DIR/eval/<split>-<step>[-flip]/` (the first model
directory's, named `<split>-ensemble-<step>_<step>...` for ensembles).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import sys
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from boneage_tpu import __version__, cli, distribute, schema
from boneage_tpu import config as config_lib
from boneage_tpu.convert import verify
from boneage_tpu.evaluate import inference, metrics, report, restore


class EvalError(ValueError):
    """Bad evaluation input or an inconsistent result; the message is one line."""


@dataclasses.dataclass
class EvalConfig:
    """Every setting of an evaluation job."""

    model_dirs: tuple[str, ...] = ()
    data: str = ""
    split: str = "val"
    checkpoint: str = "latest"  # latest | export | STEP
    tta: str = "none"  # none | flip
    output: str = ""  # "" -> MODEL_DIR/eval/<name>; with --continuous: the folder of <name>s
    batch_size: int = 0  # global; 0: each config.json's eval_batch_size, else batch_size
    continuous: bool = False
    timeout: float = 3600.0  # continuous: stop after this long without a new checkpoint
    poll_interval: float = 10.0  # continuous: seconds between looks at the model directory
    tpu: str = ""
    virtual_cpus: int = 0


def _make_config(config: EvalConfig | None, kwargs: dict[str, Any]) -> EvalConfig:
    if config is not None and kwargs:
        raise TypeError("pass either an EvalConfig or keyword arguments, not both")
    if config is not None:
        return config
    if "model_dir" in kwargs:
        kwargs["model_dirs"] = (kwargs.pop("model_dir"),)
    if isinstance(kwargs.get("model_dirs"), str):
        kwargs["model_dirs"] = (kwargs["model_dirs"],)
    kwargs["model_dirs"] = tuple(kwargs.get("model_dirs", ()))
    return EvalConfig(**kwargs)


def validate(config: EvalConfig) -> None:
    """Raises EvalError for settings that cannot work, before any model is loaded."""
    if not config.model_dirs:
        raise EvalError("--model_dir is required (repeat it to evaluate an ensemble)")
    if not config.data:
        raise EvalError("--data is required: a folder written by tools.make_tfrecords")
    if config.tta not in inference.TTA_MODES:
        raise EvalError(f"--tta must be one of {inference.TTA_MODES}, got {config.tta!r}")
    if config.batch_size < 0:
        raise EvalError(f"--batch_size must be > 0, got {config.batch_size}")
    if config.continuous and len(config.model_dirs) > 1:
        raise EvalError("--continuous follows one training run: give a single --model_dir")
    if config.continuous and config.checkpoint not in ("latest", ""):
        raise EvalError("--continuous evaluates every new checkpoint: drop --checkpoint")


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
    """Returns the eval folder name: `<split>-<step>`, `-flip` for TTA, ensembles listed."""
    labels = ["export" if s is None else str(s) for s in steps]
    name = f"{split}-{labels[0]}" if len(labels) == 1 else f"{split}-ensemble-{'_'.join(labels)}"
    return f"{name}-flip" if tta == "flip" else name


def _train_mean(manifest: dict[str, Any], config: config_lib.TrainConfig) -> tuple[float, str]:
    """Returns the training label mean for the naive baseline, and where it came from.

    The data manifest's stats when they are a train split's (the usual case: evaluating the
    val split of the training data); else, e.g. for a separately converted test set, the
    training data's mean that the trainer stored in config.json.
    """
    stats = manifest.get("label_stats") or {}
    if stats.get("split") == "train" and stats.get("mean_months") is not None:
        return float(stats["mean_months"]), "data manifest label_stats (train split)"
    return float(config.label_mean), "config.json label_mean (the model's training data)"


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
    runs, members, train_mean = [], [], None
    for model_dir in config.model_dirs:
        # config.json alone tells whether the data fits: fail before building the model.
        restore.check_data_compatible(config_lib.load_config(model_dir), manifest)
        reuse = models.get(model_dir) if models is not None and checkpoint != "export" else None
        with strategy.scope():
            loaded = restore.load_model(model_dir, checkpoint, model=reuse)
        if models is not None and checkpoint != "export":
            models[model_dir] = loaded.model
        print(f"evaluating {loaded.source} (step {loaded.step}) on {config.data} [{config.split}]")
        batch_size = config.batch_size or loaded.config.eval_batch_size or loaded.config.batch_size
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
            )
        except tf.errors.DataLossError as e:  # Names no file: find the shard by its checksum.
            raise EvalError(
                verify.describe_read_failure(config.data, manifest, [config.split], e)
            ) from None
        runs.append(predictions)
        members.append({"model_dir": model_dir, "source": loaded.source, "step": loaded.step})
        train_mean = train_mean or _train_mean(manifest, loaded.config)
    result = inference.average(runs)
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
        or config_lib.join(
            config.model_dirs[0],
            config_lib.EVAL_SUBDIR,
            output_name(config.split, steps, config.tta),
        )
    )
    values = metrics.regression_metrics(
        result.boneage,
        result.predicted,
        result.male,
        train_mean_months=train_mean[0],
    )
    values["train_mean_source"] = train_mean[1]
    values.update(
        {
            "checkpoint_step": steps[0] if len(steps) == 1 else steps,
            "models": members,
            "tta": config.tta,
            "data": config.data,
            "split": config.split,
            "data_manifest_sha256": checksum,
            "output": output,
            "boneage_tpu_version": __version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
    )
    title = f"Bone age: {', '.join(config.model_dirs)} on {config.split} ({values['n']} images)"
    report.write_outputs(
        output, values, result.ids, result.male, result.boneage, result.predicted, title=title
    )
    return values


def run(
    config: EvalConfig | None = None,
    strategy: tf.distribute.Strategy | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Runs an evaluation job.

    Args:
      config: the settings; or pass EvalConfig's fields as keyword arguments instead
        (`model_dir="..."` is accepted for a single model).
      strategy: where to run; default: built from config.tpu / config.virtual_cpus.

    Returns:
      The metrics (as in metrics.json); with `continuous`, the summary of
      `continuous_eval.run_continuous`.
    """
    config = _make_config(config, kwargs)
    validate(config)
    if strategy is None:
        for model_dir in config.model_dirs:
            paths = {"--data": config.data, "--model_dir": model_dir}
            for warning in distribute.check_paths(config.tpu, paths):
                print(f"warning: {warning}", file=sys.stderr)
        strategy = distribute.make_strategy(tpu=config.tpu, virtual_cpus=config.virtual_cpus)
        print(f"evaluating on {distribute.describe(strategy)}")
    if config.continuous:
        from boneage_tpu.evaluate import continuous as continuous_eval

        return continuous_eval.run_continuous(config, strategy)
    return evaluate_once(config, strategy)


def define_flags(flag_values: Any) -> None:
    """Defines the evaluation flags on `flag_values` (an absl FlagValues)."""
    from absl import flags

    d = EvalConfig()
    table = [
        ("multi_string", "model_dir", None, "Training run folder (local or gs://); repeat it "
         "to evaluate an ensemble (mean of the members' predictions)."),
        ("string", "data", None, "TFRecord folder written by tools.make_tfrecords."),
        ("string", "split", d.split, "Split of the data to evaluate."),
        ("string", "checkpoint", d.checkpoint, "latest, export or a training step."),
        ("string", "output", "", "Output folder; default MODEL_DIR/eval/<split>-<step>."),
        ("integer", "batch_size", 0, "Global batch; 0: the training run's eval batch size."),
        ("bool", "continuous", False, "Follow a training run: evaluate each new checkpoint "
         "once, until the run writes DONE or --timeout passes."),
        ("float", "timeout", d.timeout, "Continuous: stop after this many seconds without a "
         "new checkpoint (0: never)."),
        ("float", "poll_interval", d.poll_interval, "Continuous: seconds between looks."),
        ("string", "tpu", "", "TPU as in training: colab, local, a name or grpc:// address."),
        ("integer", "virtual_cpus", 0, "Split the CPU into N replicas (as in training)."),
    ]  # fmt: skip
    for kind, name, default, help_text in table:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values)
    flags.DEFINE_enum(
        "tta", d.tta, inference.TTA_MODES, "flip: mean over the image and its mirror.",
        flag_values=flag_values,
    )  # fmt: skip


def main(argv: Sequence[str]) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs the job; returns exit code."""
    from absl import flags

    flag_values = flags.FlagValues()
    define_flags(flag_values)
    _, status = cli.parse_flags("evaluate", flag_values, argv, __doc__)
    if status is not None:
        return status
    names = [f.name for f in dataclasses.fields(EvalConfig) if f.name != "model_dirs"]
    config = EvalConfig(
        model_dirs=tuple(flag_values.model_dir or ()),
        **{n: getattr(flag_values, n) for n in names if n in flag_values},
    )
    try:
        result = run(config)
    except (
        EvalError,
        inference.InferenceError,
        restore.ModelDirError,
        schema.ManifestError,
        FileNotFoundError,
        tf.errors.NotFoundError,
        distribute.DistributeError,
    ) as e:
        print(f"evaluate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    if config.continuous:
        print(f"evaluated steps {result['evaluated_steps']}; stopped: {result['stop_reason']}")
        return 0
    report_path = config_lib.join(result["output"], report.REPORT_HTML_NAME)
    if result["mae_months"] is None:
        print(f"n={result['n']}, no labels: predictions only; report: {report_path}")
    else:
        print(
            f"mae_months {result['mae_months']:.3f} (mean predictor "
            f"{result['mean_predictor_mae_months']:.3f}) n={result['n']}; report: {report_path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
