"""Shared pytest fixtures: paths to the optional ../shared data and a quiet TensorFlow."""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The gs:// fixtures set what TensorFlow's GCS filesystem reads at `import tensorflow`, so
# they load with this file, before any test module imports TensorFlow.
pytest_plugins = ["tests.gcs_fixtures"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
