"""The local GCS harness: TF's gs:// filesystem, google-cloud-storage and storage.py against it."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import pathlib
import queue
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import urllib.request

import numpy as np
import psutil
import pytest
import tensorflow as tf

from boneage_tpu.core import storage
from tools import gcs_emulator as harness

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _text(path: str) -> str:
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def _write(path: str, data: str | bytes) -> None:
    with tf.io.gfile.GFile(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


@pytest.mark.gcs
def test_gfile_operations_reach_the_emulator(gcs_emulator, gcs_prefix, gcs_dir):
    assert not tf.io.gfile.exists(f"{gcs_dir}/a.txt")
    tf.io.gfile.makedirs(f"{gcs_dir}/sub")
    _write(f"{gcs_dir}/a.txt", "hello")
    _write(f"{gcs_dir}/empty.txt", "")
    _write(f"{gcs_dir}/sub/b.bin", bytes(range(256)) * 10)
    assert tf.io.gfile.exists(f"{gcs_dir}/a.txt")
    assert tf.io.gfile.isdir(f"{gcs_dir}/sub")
    assert _text(f"{gcs_dir}/a.txt") == "hello"
    assert _text(f"{gcs_dir}/empty.txt") == ""
    assert tf.io.gfile.stat(f"{gcs_dir}/sub/b.bin").length == 2560
    assert sorted(tf.io.gfile.glob(f"{gcs_dir}/*.txt")) == [
        f"{gcs_dir}/a.txt",
        f"{gcs_dir}/empty.txt",
    ]
    assert sorted(tf.io.gfile.listdir(gcs_dir)) == ["a.txt", "empty.txt", "sub/"]
    tf.io.gfile.rename(f"{gcs_dir}/a.txt", f"{gcs_dir}/c.txt")
    tf.io.gfile.remove(f"{gcs_dir}/empty.txt")
    # The emulator's own listing shows what TF did: TF can only reach it through the proxy.
    assert gcs_emulator.list(gcs_prefix) == [
        f"{gcs_prefix}/",  # makedirs' folder placeholders
        f"{gcs_prefix}/c.txt",
        f"{gcs_prefix}/sub/",
        f"{gcs_prefix}/sub/b.bin",
    ]
    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).blob(f"{gcs_prefix}/c.txt")
    assert blob.download_as_bytes() == b"hello"


@pytest.mark.gcs
def test_reads_are_fresh_after_another_writer_overwrites(gcs_emulator, gcs_prefix, gcs_dir):
    # Would read the stale 2-byte size for 5 s unless GCS_STAT_CACHE_MAX_AGE=0 took effect.
    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).blob(f"{gcs_prefix}/m.json")
    blob.upload_from_string("{}")
    assert _text(f"{gcs_dir}/m.json") == "{}"
    blob.upload_from_string('{"step": 12}')
    assert _text(f"{gcs_dir}/m.json") == '{"step": 12}'


@pytest.mark.gcs
def test_tfrecords_read_back_with_parallel_interleave(gcs_emulator, gcs_prefix, gcs_dir):
    rng = np.random.default_rng(0)
    expected = set()
    paths = [f"{gcs_dir}/train-{i:05d}-of-00006.tfrecord" for i in range(6)]
    for shard, path in enumerate(paths):
        with tf.io.TFRecordWriter(path) as writer:
            for j in range(40):
                record = f"{shard}-{j}-".encode() + rng.bytes(2000)
                writer.write(record)
                expected.add(record)
    # Small read buffers make each shard many ranged GETs, six files in flight at once.
    files = tf.data.Dataset.from_tensor_slices(tf.io.gfile.glob(f"{gcs_dir}/train-*"))
    ds = files.interleave(
        lambda p: tf.data.TFRecordDataset(p, buffer_size=8192),
        cycle_length=6,
        num_parallel_calls=6,
        deterministic=False,
    )
    got = [r.numpy() for r in ds]
    assert len(got) == len(expected) and set(got) == expected
    assert len(gcs_emulator.list(f"{gcs_prefix}/train-")) == 6


@pytest.mark.gcs
def test_checkpoint_save_and_restore(gcs_dir):
    step = tf.Variable(7, dtype=tf.int64)
    weights = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step, weights=weights), f"{gcs_dir}/checkpoints", max_to_keep=2
    )
    saved = manager.save(checkpoint_number=7)
    step.assign(0)
    weights.assign(tf.zeros((2, 3)))
    assert tf.train.latest_checkpoint(f"{gcs_dir}/checkpoints") == saved
    tf.train.Checkpoint(step=step, weights=weights).restore(saved).assert_consumed()
    assert int(step.numpy()) == 7
    np.testing.assert_array_equal(weights.numpy(), np.arange(6).reshape(2, 3))


@pytest.mark.gcs
def test_keras_model_file_round_trip(gcs_dir):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.ones((4, 3), np.float32)
    model.save(f"{gcs_dir}/export/model.keras")
    loaded = keras.models.load_model(f"{gcs_dir}/export/model.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.gcs
def test_saved_model_round_trip(gcs_dir):
    module = tf.Module()
    module.scale = tf.Variable(3.0)
    module.f = tf.function(
        lambda x: {"y": x * module.scale}, input_signature=[tf.TensorSpec([None], tf.float32)]
    )
    tf.saved_model.save(module, f"{gcs_dir}/saved_model", signatures=module.f)
    loaded = tf.saved_model.load(f"{gcs_dir}/saved_model")
    out = loaded.signatures["serving_default"](tf.constant([1.0, 2.0]))
    np.testing.assert_allclose(out["y"].numpy(), [3.0, 6.0])


@pytest.mark.slow
@pytest.mark.gcs
def test_subprocess_gets_the_emulator_through_env(gcs_emulator, gcs_prefix, gcs_dir):
    code = textwrap.dedent(f"""
        import tensorflow as tf
        with tf.io.gfile.GFile("{gcs_dir}/from_child.txt", "w") as f:
            f.write("child")
        print(tf.io.gfile.listdir("{gcs_dir}"))
    """)
    env = {**os.environ, **gcs_emulator.env}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert gcs_emulator.list(gcs_prefix) == [f"{gcs_prefix}/from_child.txt"]


@pytest.mark.slow
@pytest.mark.gcs
def test_stat_cache_setting_only_counts_before_tensorflow_import(gcs_emulator, gcs_prefix):
    # Documents why tests/gcs_fixtures.py sets STATIC_ENV at conftest import: set after
    # `import tensorflow`, GCS_STAT_CACHE_MAX_AGE=0 is ignored and the 2nd read is stale.
    code = textwrap.dedent(f"""
        import json, os, sys
        import tensorflow as tf
        os.environ.update(json.loads(sys.argv[1]))
        from google.cloud import storage
        from google.auth.credentials import AnonymousCredentials
        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={{"api_endpoint": os.environ["STORAGE_EMULATOR_HOST"]}})
        blob = client.bucket("{gcs_emulator.bucket}").blob("{gcs_prefix}/f")
        path = "{gcs_emulator.gs(gcs_prefix)}/f"
        blob.upload_from_string("ab")
        first = tf.io.gfile.GFile(path).read()
        blob.upload_from_string("abcdef")
        print(first, tf.io.gfile.GFile(path).read())
    """)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(gcs_emulator.env)],
        env={k: v for k, v in os.environ.items() if k not in gcs_emulator.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["ab", "ab"]


@pytest.mark.gcs
def test_write_if_absent_on_gcs_is_create_only(gcs_emulator, gcs_prefix, gcs_dir):
    path = f"{gcs_dir}/manifest.json"
    assert storage.write_if_absent(path, '{"a": 1}')
    assert not storage.write_if_absent(path, b'{"a": 2}')
    assert _text(path) == '{"a": 1}'
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        wins = list(pool.map(lambda i: storage.write_if_absent(f"{path}.race", str(i)), range(4)))
    assert wins.count(True) == 1
    assert _text(f"{path}.race") == str(wins.index(True))


def test_write_if_absent_locally_is_create_only(tmp_path):
    path = str(tmp_path / "out" / "manifest.json")
    assert storage.write_if_absent(path, '{"a": 1}')
    assert not storage.write_if_absent(path, b'{"a": 2}')
    assert pathlib.Path(path).read_text() == '{"a": 1}'
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        wins = list(pool.map(lambda i: storage.write_if_absent(f"{path}.race", str(i)), range(4)))
    assert wins.count(True) == 1
    assert pathlib.Path(f"{path}.race").read_text() == str(wins.index(True))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "manifest.json.race",
    ]  # No temporary files left.


def test_write_if_absent_rejects_other_schemes():
    with pytest.raises(ValueError, match="local paths and gs://"):
        storage.write_if_absent("s3://bucket/x", "data")


def _make_tree(root: str) -> None:
    tf.io.gfile.makedirs(f"{root}/checkpoints/old")
    for name in ("config.json", "checkpoints/ckpt-1.index", "checkpoints/ckpt-2.index"):
        _write(f"{root}/{name}", "x")
    _write(f"{root}/checkpoints/old/ckpt-0.index", "x")


@pytest.mark.gcs
def test_list_prefix_matches_between_gcs_and_local(gcs_dir, tmp_path):
    local = str(tmp_path)
    for root in (gcs_dir, local):
        _make_tree(root)
    for query, recursive in [("/", False), ("/checkpoints/ckpt-", False), ("/", True)]:
        got = storage.list_prefix(gcs_dir + query, recursive=recursive)
        want = storage.list_prefix(local + query, recursive=recursive)
        assert [p[len(gcs_dir) :] for p in got] == [p[len(local) :] for p in want]
    assert storage.list_prefix(f"{gcs_dir}/checkpoints/") == [
        f"{gcs_dir}/checkpoints/ckpt-1.index",
        f"{gcs_dir}/checkpoints/ckpt-2.index",
        f"{gcs_dir}/checkpoints/old/",
    ]
    assert storage.list_prefix(f"{gcs_dir}/nothing/") == []
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket not found"):
        storage.list_prefix("gs://no-such-bucket/x/")


@pytest.mark.gcs
def test_proxy_only_tunnels_to_gcs_hosts(gcs_emulator):
    host, port = gcs_emulator.proxy_url.removeprefix("http://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=10)
    conn.set_tunnel("example.com", 443)
    with pytest.raises(OSError, match="403"):
        conn.request("GET", "/")
    conn.close()


@pytest.mark.gcs
def test_proxy_returns_https_upload_urls(gcs_emulator):
    # fake-gcs-server builds the resumable-upload URL from X-Forwarded-Proto (set by the proxy).
    host, port = gcs_emulator.proxy_url.removeprefix("http://").split(":")
    context = ssl.create_default_context(cafile=gcs_emulator.certificates.ca_cert)
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    conn.set_tunnel("www.googleapis.com", 443)
    bucket = gcs_emulator.bucket
    conn.request("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=resumable&name=t/u", b"")
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200
    assert response.getheader("Location").startswith("https://www.googleapis.com/upload/")


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.gcs
def test_own_instance_stops_both_processes():
    emulator = harness.GcsEmulator(bucket="own-instance")
    with emulator:
        pids = emulator.pids
        workdir = emulator.workdir
        assert sorted(pids) == ["proxy", "server"]
        assert all(psutil.pid_exists(pid) for pid in pids.values())
        emulator.client().bucket("own-instance").blob("x").upload_from_string("1")
        assert emulator.list() == ["x"]
    assert all(_gone(pid) for pid in pids.values())
    assert not workdir.exists()
    assert emulator.pids == {}


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    # A reader thread, as select() cannot see lines already pulled into the pipe's buffer.
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    got: list[str] = []
    while not got or marker not in got[-1]:
        try:
            got.append(lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no {marker!r} within {timeout} s; got {got}") from None
    return got


@pytest.mark.gcs
def test_cli_prints_env_and_leaves_no_process(tmp_path):
    env_file = tmp_path / "gcs.env"
    cli = subprocess.Popen(
        [sys.executable, "-m", "tools.gcs_emulator", "--bucket", "cli-bucket"]
        + ["--env_file", str(env_file)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _read_until(cli, "Ctrl-C", timeout=60)
        children = psutil.Process(cli.pid).children(recursive=True)
        exports = dict(
            line.removeprefix("export ").strip().split("=", 1)
            for line in lines
            if line.startswith("export ")
        )
        assert {"https_proxy", "CURL_CA_BUNDLE", "GCS_STAT_CACHE_MAX_AGE"} <= exports.keys()
        assert env_file.read_text().strip() == "".join(lines[1:-1]).strip()
        url = f"{exports['STORAGE_EMULATOR_HOST']}/storage/v1/b"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert "cli-bucket" in response.read().decode()
        assert len(children) == 2
    finally:
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=30) == 0
        cli.stdout.close()
    assert all(_gone(child.pid) for child in children)


@pytest.mark.gcs
def test_server_start_retries_when_its_port_is_taken(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        free = harness._free_port()
        ports = iter([taken.getsockname()[1], free])
        monkeypatch.setattr(harness, "_free_port", lambda: next(ports))
        with harness.GcsEmulator(bucket="retry") as emulator:
            assert emulator.server_url == f"http://127.0.0.1:{free}"
            assert emulator.list() == []


def test_gcs_client_without_credentials_says_how_to_log_in(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    storage._client.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match="gcloud auth application-default login"):
            storage.gcs_client()
    finally:
        storage._client.cache_clear()


def test_gcs_without_the_client_library_names_the_extra(monkeypatch):
    import google.cloud

    monkeypatch.delattr(google.cloud, "storage", raising=False)
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
    storage._client.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match=r"pip install 'boneage-tpu\[gcs\]'"):
            storage.write_if_absent("gs://bucket/x", "data")
    finally:
        storage._client.cache_clear()
