"""pytest fixtures for gs:// tests: one local GCS emulator per test session.

`tests/conftest.py` imports this module, so the settings that TensorFlow's GCS filesystem
reads once, at `import tensorflow`, are in the environment before any test module imports TF.

Use in tests (mark them `@pytest.mark.gcs`):

    def test_x(gcs_emulator, gcs_prefix, gcs_dir):
        path = f"{gcs_dir}/manifest.json"          # gs://boneage-test/<unique>/manifest.json
        ...tf.io.gfile / boneage_tpu code on `path`, in process...
        subprocess.run([...], env={**os.environ, **gcs_emulator.env}, check=True)
        assert gcs_emulator.list(gcs_prefix) == [...]  # what the emulator really holds

The emulator's two processes outlive every subprocess call and are stopped, by PID, when the
session ends. `os.environ` keeps the emulator settings for the whole session (subprocesses
inherit them), so a plain `subprocess.run(...)` works too.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator

import pytest

from tools.gcs_emulator import STATIC_ENV, EmulatorError, GcsEmulator

# Must happen before `import tensorflow`: TF ignores later changes (see test_gcs_emulator.py).
_TF_IMPORTED_FIRST = "tensorflow" in sys.modules and any(
    os.environ.get(k) != v for k, v in STATIC_ENV.items()
)
os.environ.update(STATIC_ENV)


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """A running emulator (bucket `boneage-test`) with its env applied to this process."""
    if _TF_IMPORTED_FIRST:
        pytest.fail(
            "tensorflow was imported before tests/gcs_fixtures.py set "
            f"{sorted(STATIC_ENV)}: gs:// reads would be stale; import it from conftest first"
        )
    try:
        emulator = GcsEmulator().start()
    except EmulatorError as e:
        pytest.fail(f"cannot start the local GCS emulator: {e}")
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        emulator.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def gcs_prefix(request: pytest.FixtureRequest) -> str:
    """A fresh object-name prefix for one test, e.g. `t/test_name-1a2b3c4d` (no trailing '/')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"t/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gcs_dir(gcs_emulator: GcsEmulator, gcs_prefix: str) -> str:
    """`gs://<bucket>/<gcs_prefix>`: a folder on the emulator that no other test uses."""
    return gcs_emulator.gs(gcs_prefix)
