"""Shared pytest fixtures: the session's toy and phantom data, paths to the optional ../shared
data, and a quiet TensorFlow.

The data fixtures build each data set once per session, under `tmp_path_factory`, and hand the
same folder to every test that asks: tests read it and never change it (a test that needs to
change files copies the folder first). They import TensorFlow lazily: this file loads before
`tests.gcs_fixtures` has set the environment TensorFlow's GCS filesystem reads at import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from collections.abc import Callable

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


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """`toy_dataset(**options)` -> a toy TFRecord folder (`tests.records.write_toy_dataset`
    with those options), written once per session for each set of options. Read-only."""
    from tests.records import write_toy_dataset

    built: dict[str, str] = {}

    def build(**options) -> str:
        key = json.dumps(options, sort_keys=True)
        if key not in built:
            path = tmp_path_factory.mktemp("toy") / "records"
            write_toy_dataset(path, **options)
            built[key] = str(path)
        return built[key]

    return build


@pytest.fixture(scope="session")
def toy_data(toy_dataset: Callable[..., str]) -> str:
    """The default toy TFRecords: 24 train and 10 val records, 40x32 PNG, 2 shards per split."""
    return toy_dataset()


@pytest.fixture(scope="session")
def phantom_images(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pathlib.Path]:
    """`phantom_images(num_images, seed=, width=, height=)` -> the root of a phantom set in the
    Kaggle layout (`boneage-training-dataset.csv` and `boneage-training-dataset/`), generated
    once per session for each set of arguments. Read-only: copy it to change or add files."""
    from boneage_tpu.phantom import job as make_phantom

    built: dict[tuple[int, int, int, int], pathlib.Path] = {}

    def build(num_images: int, *, seed: int, width: int, height: int) -> pathlib.Path:
        key = (num_images, seed, width, height)
        if key not in built:
            root = tmp_path_factory.mktemp("phantom")
            make_phantom.generate(
                str(root), num_images, seed=seed, width=width, height=height, num_workers=1
            )
            built[key] = root
        return built[key]

    return build


@pytest.fixture(scope="session")
def phantom_run(phantom_images, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 phantom PNGs converted to 40-px JPEG records, and a model directory made for them
    (`tests.model_dirs.make_run`); for the predict tests. Read-only."""
    from boneage_tpu.convert import job as make_tfrecords
    from tests.model_dirs import make_run

    phantom = phantom_images(6, seed=3, width=64, height=80)
    root = tmp_path_factory.mktemp("predict")
    labels = phantom / "boneage-training-dataset.csv"
    images = phantom / "boneage-training-dataset"
    manifest = make_tfrecords.convert(
        str(labels),
        str(images),
        str(root / "records"),
        image_size=40,
        encoding="jpeg",
        split_name="test",
        num_workers=1,
        quiet=True,
    )
    return {
        "root": root,
        "labels": str(labels),
        "images": images,
        "records": str(root / "records"),
        "model": make_run(root / "run", manifest),
    }
