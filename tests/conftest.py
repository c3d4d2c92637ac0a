"""Shared pytest fixtures: paths to the optional ../shared data and a quiet TensorFlow."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The gs:// fixtures set what TensorFlow's GCS filesystem reads at `import tensorflow`, so
# they load with this file, before any test module imports TensorFlow.
pytest_plugins = ["tests.gcs_fixtures"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# The seed comparisons need tf_keras, which is not in the `dev` extra (it would pull a second
# TensorFlow distribution; setup.cfg `seed`). .ci/run installs it without dependencies.
requires_tf_keras = pytest.mark.skipif(
    importlib.util.find_spec("tf_keras") is None,
    reason='needs tf-keras: pip install --no-deps "tf-keras==2.21.*" (.ci/run does)',
)


def pytest_configure(config: pytest.Config) -> None:
    """Splits the CPU into 8 logical devices for the whole session, before TF's first op.

    Multi-replica tests (MirroredStrategy over virtual CPUs) need it; single-device code is
    unaffected, and doing it here makes the session independent of test-module import order.
    """
    del config
    from boneage_tpu.core import distribute

    distribute.configure_virtual_cpus(8)


@pytest.fixture(scope="session")
def rsna_sample_dir() -> pathlib.Path:
    """The 12 real RSNA PNGs in Kaggle layout; skips when ../shared is absent."""
    path = SHARED_DATA / "rsna-sample"
    if not (path / "boneage-training-dataset.csv").exists():
        pytest.skip("../shared/data/rsna-sample not present")
    return path


@pytest.fixture(scope="session")
def rsna_labels_csv() -> pathlib.Path:
    """The official 12,611 RSNA training labels; skips when ../shared is absent."""
    path = SHARED_DATA / "rsna-train-labels.csv"
    if not path.exists():
        pytest.skip("../shared/data/rsna-train-labels.csv not present")
    return path
