"""A two-process MultiWorkerMirroredStrategy cluster on 127.0.0.1 (TF_CONFIG), on CPU.

Trains a few steps, is killed after a checkpoint, resumes: both workers must restore the
chief's step and weights, evaluate uneven validation shards without hanging, and only the
chief may leave files in the model directory. A worker that cannot see the chief's checkpoints
must stop both workers with one line instead of training out of step.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # per phase; a hang (the failure this guards against) ends the test there

pytestmark = pytest.mark.slow


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _cluster(kill_at: int, flags_per_worker: list[list[str]]) -> list[tuple[int, str]]:
    """Runs both workers to the end; returns (exit status, output) per worker."""
    ports = ",".join(map(str, _free_ports(2)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiworker_driver", str(i), ports, str(kill_at), *f],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, f in enumerate(flags_per_worker)
    ]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            proc.kill()
    return results


def _weights(output: str) -> dict[int, tuple[str, str]]:
    """step -> (trainable checksum, all-weights checksum) after that step's loop.

    The moving statistics are averaged over the workers before each checkpoint (even steps
    here), so all weights agree there; trainable weights agree after every step.
    """
    found = re.findall(r"^weights (\d+) (\S+) (\S+)$", output, re.M)
    return {int(step): (trainable, every) for step, trainable, every in found}


def _agree(chief: str, worker: str) -> None:
    ours, theirs = _weights(chief), _weights(worker)
    assert sorted(ours) == sorted(theirs)
    for step in ours:
        assert ours[step][0] == theirs[step][0], f"trainable weights differ after step {step}"
        if step % 2 == 0:
            assert ours[step] == theirs[step], f"moving statistics differ after step {step}"


def _val_lines(output: str) -> list[str]:
    return re.findall(r"^val +step .*$", output, re.M)


def test_two_workers_resume_from_the_chief_evaluate_uneven_shards_and_only_the_chief_writes(
    toy_dataset, tmp_path: pathlib.Path
) -> None:
    # Validation shards of 4, 3 and 3 records: worker 0 reads shards 0 and 2 (7 records, 4
    # batches of 2), worker 1 shard 1 (3 records, 2 batches).
    data = toy_dataset(splits={"train": 24, "val": 10}, shards_per_split=3)
    model_dir = tmp_path / "model"
    flags = [
        f"--data={data}",
        f"--model_dir={model_dir}",
        "--backbone=tiny",
        "--image_size=32",
        "--dense_units=16",
        "--dropout=0.2",
        "--batch_size=4",
        "--eval_batch_size=4",
        "--steps_per_loop=1",
        "--checkpoint_every=2",
        "--eval_every=2",
        "--train_steps=6",
        "--learning_rate=0.001",
        "--augment=false",
    ]

    first = _cluster(kill_at=4, flags_per_worker=[flags, flags])
    for status, out in first:
        assert status == 17, out
    _agree(first[0][1], first[1][1])
    checkpoints = sorted(p.name for p in (model_dir / "checkpoints").glob("ckpt-*.index"))
    assert checkpoints == ["ckpt-2.index", "ckpt-4.index"]

    second = _cluster(kill_at=0, flags_per_worker=[flags, flags])
    (chief_status, chief_out), (worker_status, worker_out) = second
    assert chief_status == 0, chief_out
    assert worker_status == 0, worker_out
    for out in (chief_out, worker_out):
        assert "resuming at step 4 of 6" in out
    # Equal after the first resumed step: both restored the chief's weights (and optimizer).
    assert sorted(_weights(chief_out)) == [5, 6]
    _agree(chief_out, worker_out)
    # Uneven shards: both workers finished every validation and agree on it, over all 10.
    assert len(_val_lines(chief_out)) == 1  # step 6 (step 4's ran before the kill)
    assert _val_lines(chief_out) == _val_lines(worker_out)
    assert "n=10" in _val_lines(chief_out)[0]
    # Only the chief wrote: DONE, exports, logs in the model directory; no worker folder left.
    done = json.loads((model_dir / "DONE").read_text())
    assert done["step"] == 6
    assert (model_dir / "export" / "model.keras").exists()
    assert not (model_dir / "workers").exists()
    assert "the chief writes the results" in worker_out
    assert (model_dir / "checkpoints" / "ckpt-6.index").exists()


def test_a_worker_that_cannot_see_the_chiefs_checkpoints_stops_both(
    toy_data, tmp_path: pathlib.Path
) -> None:
    data = toy_data  # 24 train and 10 val records, 2 shards per split
    common = [
        f"--data={data}",
        "--backbone=tiny",
        "--image_size=32",
        "--dense_units=16",
        "--batch_size=4",
        "--steps_per_loop=1",
        "--checkpoint_every=2",
        "--augment=false",
    ]
    chief_dir, own_disk = tmp_path / "model", tmp_path / "elsewhere"
    first = _cluster(
        0, [[*common, f"--model_dir={chief_dir}", "--train_steps=2"]] * 2
    )  # a finished run at step 2, written by the chief
    assert [status for status, _ in first] == [0, 0], first
    # Continued, but worker 1 looks at a folder of its own (as if on its own machine's disk).
    second = _cluster(
        0,
        [
            [*common, f"--model_dir={chief_dir}", "--train_steps=4"],
            [*common, f"--model_dir={own_disk}", "--train_steps=4"],
        ],
    )
    for status, out in second:
        assert status == 1, out
        last = out.strip().splitlines()[-1]
        assert last.startswith("train: error: the workers restored different steps"), out
        assert "must read the chief's checkpoints" in last
