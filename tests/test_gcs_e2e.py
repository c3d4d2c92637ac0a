"""End-to-end runs on gs:// (the local GCS emulator): convert, train, kill, resume, evaluate.

The user path, run as subprocesses with the emulator's environment: phantom images ->
`tools.make_tfrecords --output gs://...` (killed and resumed too) -> `boneage_tpu.train --data
gs://... --model_dir gs://...` (SIGKILLed after a checkpoint, then resumed) ->
`boneage_tpu.evaluate`. What they wrote is read back with the google-cloud-storage client,
which talks to the emulator directly: TF can only reach it through the TLS proxy, so every
object listed there went through TF's real gs:// filesystem. Subprocesses run in an empty
folder that must stay empty (a path mistaken for a local one would show up there as `gs:/`).

The last tests pin where google-cloud-storage serves: a create-only manifest (generation
precondition) for racing converters, and listing-only polls in the continuous evaluator.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import uuid

import psutil
import pytest
import tensorflow as tf

from boneage_tpu.convert import job as make_tfrecords
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import schema, storage
from boneage_tpu.data.layouts import ConvertError
from boneage_tpu.evaluate import continuous as continuous_eval
from boneage_tpu.evaluate import job as evaluate
from tests.helpers import without_time

pytestmark = pytest.mark.gcs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_IMAGES = 40
NUM_SHARDS = 3  # per split
CONVERT_OPTIONS = {
    "image_size": 48,
    "encoding": "jpeg",
    "val_fraction": 0.2,
    "num_shards": NUM_SHARDS,
}
CONVERT_FLAGS = [f"--{k}={v}" for k, v in CONVERT_OPTIONS.items()] + ["--quiet"]
TRAIN_STEPS = 4
TRAIN_FLAGS = [
    "--backbone=tiny",
    "--image_size=32",
    "--dense_units=8",
    "--batch_size=4",
    f"--train_steps={TRAIN_STEPS}",
    "--steps_per_loop=1",
    "--checkpoint_every=2",
]
KILL_AT_STEP = 3  # After the step-2 checkpoint, before the step-4 one.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The trainer has no kill hook of its own: this runs its CLI with an `after_loop` that SIGKILLs
# the process (no clean-up at all, as a preemption) once the given step's loop is over.
KILLING_TRAINER = """
import os, signal, sys
from boneage_tpu.cli import train as job

def hook(step):
    if step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)

sys.exit(job.main(sys.argv, after_loop=hook))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The empty current folder of every subprocess (checked to stay empty)."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(autouse=True)
def _nothing_written_locally(workdir: pathlib.Path):
    """Fails a test after which a local file or folder appeared for a gs:// path."""
    yield
    assert list(workdir.iterdir()) == [], "a gs:// path was written as a local path"
    assert not (REPO_ROOT / "gs:").exists(), "a gs:// path was written as a local path"


def _run(args: list[str], workdir: pathlib.Path, env: dict[str, str], **extra_env: str):
    """Runs `python ARGS` with the emulator env in `workdir`; returns the CompletedProcess."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args],
        cwd=workdir,
        env={**os.environ, **env, "PYTHONPATH": path, **extra_env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, (
        f"exit {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    )
    return done.stdout


def _no_process_mentions(marker: str) -> None:
    """Fails when a process (e.g. a converter worker outliving its killed parent) is left."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in arg for arg in proc.info["cmdline"] or ()):
            left.append(proc)
    _, alive = psutil.wait_procs(left, timeout=10)  # PDEATHSIG'd workers may take a moment.
    assert alive == [], [p.info["cmdline"] for p in alive]


def _blob(emulator, name: str):
    blob = emulator.client().bucket(emulator.bucket).get_blob(name)
    assert blob is not None, f"gs://{emulator.bucket}/{name} not on the emulator"
    return blob


def _records(paths: list[str]) -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset(paths)]


@pytest.fixture(scope="module")
def phantom(phantom_images) -> tuple[str, str]:
    """(labels CSV, images folder) of the session's small phantom set in the Kaggle layout."""
    root = phantom_images(NUM_IMAGES, seed=0, width=96, height=120)
    return str(root / "boneage-training-dataset.csv"), str(root / "boneage-training-dataset")


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict]:
    """(folder, manifest) of the same conversion written locally, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    manifest = make_tfrecords.convert(
        *phantom, str(out), num_workers=0, quiet=True, **CONVERT_OPTIONS
    )
    return out, manifest


@pytest.fixture(scope="module")
def e2e_prefix(gcs_emulator) -> str:
    """An object-name prefix for this module's shared gs:// data and run."""
    return f"e2e/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def gcs_data(gcs_emulator, phantom, e2e_prefix, workdir) -> tuple[str, dict]:
    """(gs:// folder, manifest) converted by the converter CLI straight to gs://."""
    output = gcs_emulator.gs(f"{e2e_prefix}/data")
    labels, images = phantom
    convert = ["-m", "tools.make_tfrecords", f"--labels={labels}", f"--images={images}"]
    _ok(
        _run(
            [*convert, f"--output={output}", *CONVERT_FLAGS, "--num_workers=1"],
            workdir,
            gcs_emulator.env,
        )
    )
    return output, schema.read_manifest(output)


@pytest.mark.slow
def test_converter_cli_writes_shards_and_manifest_to_gcs(
    gcs_emulator, gcs_data, e2e_prefix, reference
):
    output, manifest = gcs_data
    ref_dir, ref_manifest = reference
    assert without_time(manifest) == without_time(ref_manifest)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert len(shards) == 2 * NUM_SHARDS
    names = gcs_emulator.list(f"{e2e_prefix}/data/")
    assert [n for n in names if not n.endswith("/")] == sorted(
        [f"{e2e_prefix}/data/{n}" for n in ("manifest.json", "dataset_info.json", "features.json")]
        + [f"{e2e_prefix}/data/{s['name']}" for s in shards]
    )  # And no `.convert/` state left behind.
    for shard in shards:
        data = _blob(gcs_emulator, f"{e2e_prefix}/data/{shard['name']}").download_as_bytes()
        assert data == (ref_dir / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"]
    for split in manifest["splits"]:
        assert _records(schema.shard_paths(output, manifest, split)) == _records(
            schema.shard_paths(str(ref_dir), ref_manifest, split)
        )


@pytest.mark.slow
def test_killed_converter_resumes_on_gcs_to_identical_bytes(
    gcs_emulator, gcs_prefix, gcs_dir, phantom, reference, workdir
):
    ref_dir, ref_manifest = reference
    output = f"{gcs_dir}/data"
    labels, images = phantom
    command = ["-m", "tools.make_tfrecords", f"--labels={labels}", f"--images={images}"]
    command += [f"--output={output}", *CONVERT_FLAGS, "--num_workers=2"]
    killed = _run(command, workdir, gcs_emulator.env, **{make_tfrecords.KILL_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _no_process_mentions(output)
    first = [schema.shard_name("train", i, NUM_SHARDS) for i in range(2)]
    names = gcs_emulator.list(f"{gcs_prefix}/data/")
    assert [n.rsplit("/", 1)[-1] for n in names if n.endswith(".tfrecord")] == first
    assert f"{gcs_prefix}/data/manifest.json" not in names
    assert f"{gcs_prefix}/data/.convert/plan.json" in names
    generations = {n: _blob(gcs_emulator, f"{gcs_prefix}/data/{n}").generation for n in first}

    _ok(_run(command, workdir, gcs_emulator.env))
    manifest = schema.read_manifest(output)
    assert without_time(manifest) == without_time(ref_manifest)
    # The two shards finished before the kill were kept, not rewritten.
    assert {
        n: _blob(gcs_emulator, f"{gcs_prefix}/data/{n}").generation for n in first
    } == generations
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            data = _blob(gcs_emulator, f"{gcs_prefix}/data/{shard['name']}").download_as_bytes()
            assert data == (ref_dir / shard["name"]).read_bytes()
    for split in manifest["splits"]:
        assert _records(schema.shard_paths(output, manifest, split)) == _records(
            schema.shard_paths(str(ref_dir), ref_manifest, split)
        )
    assert not any("/.convert/" in n for n in gcs_emulator.list(f"{gcs_prefix}/data/"))


@dataclasses.dataclass
class TrainedRun:
    """A gs:// training run that was SIGKILLed once and resumed, with what each run printed."""

    model_dir: str
    prefix: str  # object-name prefix of model_dir
    killed: subprocess.CompletedProcess
    killed_names: list[str]  # the emulator's objects right after the kill
    resumed_stdout: str


@pytest.fixture(scope="module")
def trained_run(gcs_emulator, gcs_data, e2e_prefix, workdir) -> TrainedRun:
    """Trains on the gs:// data into a gs:// model dir; killed at KILL_AT_STEP, then resumed."""
    data, _ = gcs_data
    prefix = f"{e2e_prefix}/run"
    model_dir = gcs_emulator.gs(prefix)
    flags = [f"--data={data}", f"--model_dir={model_dir}", *TRAIN_FLAGS]
    killed = _run(
        ["-c", KILLING_TRAINER, *flags], workdir, gcs_emulator.env, KILL_AT_STEP=str(KILL_AT_STEP)
    )
    killed_names = gcs_emulator.list(f"{prefix}/")
    resumed = _ok(_run(["-m", "boneage_tpu.train", *flags], workdir, gcs_emulator.env))
    return TrainedRun(model_dir, prefix, killed, killed_names, resumed)


def _event_steps(logdir: str) -> dict[str, list[int]]:
    """tag -> every step it was logged at (duplicates kept), read from gs://."""
    steps: dict[str, list[int]] = {}
    for path in tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(int(event.step))
    return {tag: sorted(s) for tag, s in steps.items()}


@pytest.mark.slow
def test_killed_trainer_resumes_from_its_gcs_checkpoint(gcs_emulator, gcs_data, trained_run):
    run, prefix = trained_run, trained_run.prefix
    assert run.killed.returncode == -signal.SIGKILL, run.killed.stderr[-3000:]
    _no_process_mentions(run.model_dir)
    assert f"step {KILL_AT_STEP}/{TRAIN_STEPS}" in run.killed.stdout
    ckpt = f"{prefix}/checkpoints"
    assert f"{ckpt}/ckpt-2.index" in run.killed_names
    assert f"{prefix}/config.json" in run.killed_names
    assert not any(
        n.startswith((f"{ckpt}/ckpt-4", f"{prefix}/DONE", f"{prefix}/export/"))
        for n in run.killed_names
    )

    assert f"resuming at step 2 of {TRAIN_STEPS}" in run.resumed_stdout
    progress = [
        line.split()[1] for line in run.resumed_stdout.splitlines() if line.startswith("step ")
    ]
    assert progress == ["3/4", "4/4"]

    names = set(gcs_emulator.list(f"{prefix}/"))
    expected = {
        f"{prefix}/config.json",
        f"{prefix}/DONE",
        f"{ckpt}/checkpoint",
        f"{ckpt}/ckpt-2.index",
        f"{ckpt}/ckpt-4.index",
        f"{prefix}/export/model.keras",
        f"{prefix}/export/saved_model/saved_model.pb",
    }
    assert expected <= names, sorted(expected - names)
    assert any(n.startswith(f"{ckpt}/ckpt-4.data-") for n in names)
    done = json.loads(_blob(gcs_emulator, f"{prefix}/DONE").download_as_bytes())
    assert done["step"] == TRAIN_STEPS
    config = json.loads(_blob(gcs_emulator, f"{prefix}/config.json").download_as_bytes())
    assert config["data"]["path"] == gcs_data[0] and config["model_dir"] == run.model_dir
    derived = json.loads(_blob(gcs_emulator, f"{prefix}/derived.json").download_as_bytes())
    assert derived["label_mean"] == pytest.approx(gcs_data[1]["label_stats"]["mean_months"])
    assert model_dir_lib.checkpoint_step(f"{run.model_dir}/checkpoints/ckpt-4") == TRAIN_STEPS
    # Step 3 ran twice (before the kill and after the restart) but is logged once: the killed
    # run's flushed event file made it to gs://.
    assert _event_steps(f"{run.model_dir}/logs/train")["loss"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_evaluate_cli_writes_its_outputs_to_gcs(gcs_emulator, gcs_data, trained_run, workdir):
    data, manifest = gcs_data
    run = trained_run
    stdout = _ok(
        _run(
            ["-m", "boneage_tpu.evaluate", f"--model_dir={run.model_dir}", f"--data={data}"],
            workdir,
            gcs_emulator.env,
        )
    )
    out = f"{run.prefix}/eval/val-{TRAIN_STEPS}"
    assert f"report: {gcs_emulator.gs(out)}/report.html" in stdout
    names = [n for n in gcs_emulator.list(f"{out}/") if not n.endswith("/")]
    assert names == [
        f"{out}/{n}" for n in ("metrics.json", "predictions.csv", "report.html", "report.png")
    ]
    n_val = manifest["splits"]["val"]["count"]
    metrics = json.loads(_blob(gcs_emulator, f"{out}/metrics.json").download_as_bytes())
    assert metrics["n"] == n_val and metrics["checkpoint_step"] == TRAIN_STEPS
    assert metrics["data"] == data and metrics["output"] == gcs_emulator.gs(out)
    # The same checkpoint and data as the trainer's own final validation.
    done = json.loads(_blob(gcs_emulator, f"{run.prefix}/DONE").download_as_bytes())
    assert metrics["mae_months"] == pytest.approx(done["metrics"]["val_mae_months"], abs=1e-3)
    text = _blob(gcs_emulator, f"{out}/predictions.csv").download_as_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    val_ids = {
        schema.parse_examples(r)["id"].numpy().decode()
        for r in tf.data.TFRecordDataset(schema.shard_paths(data, manifest, "val"))
    }
    assert len(rows) == n_val and {r["id"] for r in rows} == val_ids
    assert _blob(gcs_emulator, f"{out}/report.png").download_as_bytes().startswith(PNG_MAGIC)
    assert "<html" in _blob(gcs_emulator, f"{out}/report.html").download_as_text().lower()


@pytest.mark.slow
def test_continuous_evaluator_follows_the_gcs_run(gcs_emulator, gcs_data, trained_run):
    data, manifest = gcs_data
    run = trained_run
    base = f"{run.model_dir}/eval-continuous"
    config = evaluate.EvalConfig(
        model_dirs=(run.model_dir,), data=data, output=base, continuous=True, timeout=60
    )
    summary = continuous_eval.run_continuous(config, tf.distribute.get_strategy())
    assert summary["stop_reason"] == "done"
    assert summary["evaluated_steps"] == [2, TRAIN_STEPS] and summary["skipped"] == []
    for step in (2, TRAIN_STEPS):
        names = gcs_emulator.list(f"{run.prefix}/eval-continuous/val-{step}/")
        assert f"{run.prefix}/eval-continuous/val-{step}/metrics.json" in names
    assert summary["metrics"][2]["n"] == manifest["splits"]["val"]["count"]
    # A restarted evaluator finds the results on gs:// and evaluates nothing again.
    again = continuous_eval.run_continuous(config, tf.distribute.get_strategy())
    assert again["evaluated_steps"] == [] and again["already_evaluated_steps"] == [2, TRAIN_STEPS]


def _convert_racing(phantom, output: str, rival_manifest: str, blob) -> dict:
    """Converts into `output`; a rival's manifest lands after the last shard, before ours."""
    done: list[str] = []

    def rival_finishes_first(name: str) -> None:
        done.append(name)
        if len(done) == 2 * NUM_SHARDS:
            blob.upload_from_string(rival_manifest)

    return make_tfrecords.convert(
        *phantom,
        output,
        num_workers=0,
        quiet=True,
        on_shard_done=rival_finishes_first,
        **CONVERT_OPTIONS,
    )


def test_converter_losing_the_manifest_race_fails_and_overwrites_nothing(
    gcs_emulator, gcs_prefix, gcs_dir, phantom
):
    name = f"{gcs_prefix}/data/manifest.json"
    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).blob(name)
    rival = json.dumps({"schema_version": schema.SCHEMA_VERSION, "plan_sha256": "other"})
    with pytest.raises(ConvertError, match="manifest.json"):
        _convert_racing(phantom, f"{gcs_dir}/data", rival, blob)
    winner = _blob(gcs_emulator, name)
    assert winner.download_as_text() == rival and winner.generation == blob.generation


def test_identical_converters_racing_keep_the_first_manifest(
    gcs_emulator, gcs_prefix, gcs_dir, phantom, reference
):
    ref_dir, ref_manifest = reference
    name = f"{gcs_prefix}/data/manifest.json"
    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).blob(name)
    first = (ref_dir / "manifest.json").read_text()
    assert _convert_racing(phantom, f"{gcs_dir}/data", first, blob) == ref_manifest
    winner = _blob(gcs_emulator, name)
    assert winner.download_as_text() == first and winner.generation == blob.generation
    assert not any("/.convert/" in n for n in gcs_emulator.list(f"{gcs_prefix}/data/"))


def test_idle_continuous_polls_only_list_the_gcs_checkpoint_folder(
    gcs_emulator, gcs_dir, monkeypatch
):
    model_dir = f"{gcs_dir}/run"
    model_dir_lib.save_config(
        config_lib.TrainConfig.from_flags(model_dir=model_dir, backbone="tiny")
    )
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step),
        model_dir_lib.checkpoint_dir(model_dir),
        3,
        checkpoint_name="ckpt",
    )
    for s in (1, 2):
        step.assign(s)
        manager.save(checkpoint_number=s)
        storage.write_if_absent(f"{model_dir}/eval/val-{s}/metrics.json", "{}")  # Evaluated.
    reads, listings, sleeps = [], [], []
    list_checkpoints, list_prefix = model_dir_lib.list_checkpoints, storage.list_prefix
    monkeypatch.setattr(
        model_dir_lib, "list_checkpoints", lambda d: reads.append(d) or list_checkpoints(d)
    )
    monkeypatch.setattr(
        storage, "list_prefix", lambda p, **kw: listings.append(p) or list_prefix(p, **kw)
    )
    ticks = iter(range(1000))
    config = evaluate.EvalConfig(model_dirs=(model_dir,), data="unused", continuous=True, timeout=5)
    summary = continuous_eval.run_continuous(
        config, tf.distribute.get_strategy(), sleep=sleeps.append, clock=lambda: next(ticks)
    )
    assert summary["stop_reason"] == "timeout" and summary["already_evaluated_steps"] == [1, 2]
    polls = len(sleeps) + 1
    assert polls > 3
    # The first poll reads the checkpoint state; the idle ones make one listing call each.
    assert len(reads) == 1
    assert len(listings) == polls and all(p.startswith(model_dir) for p in listings)
