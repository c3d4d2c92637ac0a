"""Test-time augmentation, view by view: which views and which corner fill help, on which export.

    python -m tools.benchmark_tta --model_dir DIR --sets val=DATA[,contrast_x0.5=DATA2,...]
        [--split val] [--fills black,background] [--json P]

For every set (name=converted folder; its `--split` is evaluated) and every fill of the rotated
views' uncovered corners (`inference.TTA_FILLS`), the model predicts the ten rotflip views
(-10, -5, 0, 5, 10 degrees, each with and without the mirror) of every record once. From those
views, uncorrected (the network's own predictions: the model's baked bias line is undone),
it reports each view's MAE and the MAE of the mean of several view subsets: none (the plain
view), flip (0 degrees, both mirrors), rot (the five angles, unmirrored), rot5flip (0 and
+-5 degrees, both mirrors) and rotflip (all ten). Each subset's mean is the same average the
matching `evaluate --tta` mode computes, so the subsets need no pass of their own. The
shifted sets of `tools.benchmark_real` (OUTPUT/robustness/<name>/data) are the usual --sets.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from boneage_tpu import cli  # noqa: E402
from boneage_tpu.cli import option  # noqa: E402
from boneage_tpu.core.errors import UsageError  # noqa: E402
from tools import _summary  # noqa: E402

FILLS = ("black", "background")  # inference.TTA_FILLS, kept TF-free for --help
# Subsets of the rotflip views: name -> the (angle, mirrored) views averaged.
SUBSETS: dict[str, tuple[tuple[float, bool], ...]] = {
    "none": ((0.0, False),),
    "flip": ((0.0, False), (0.0, True)),
    "rot": tuple((a, False) for a in (-10.0, -5.0, 0.0, 5.0, 10.0)),
    "rot5flip": tuple((a, m) for a in (-5.0, 0.0, 5.0) for m in (False, True)),
    "rotflip": tuple((a, m) for a in (-10.0, -5.0, 0.0, 5.0, 10.0) for m in (False, True)),
}


@dataclasses.dataclass
class BenchConfig:
    """Settings of one benchmark run."""

    model_dir: str = option("", "The trained run to evaluate.", required=True)
    sets: tuple[str, ...] = option(
        (),
        "name=converted folder, comma-separated (e.g. val=runs/x/data).",
        required=True,
        comma_list=True,
    )
    split: str = option("val", "The split of every set that is evaluated.")
    fills: tuple[str, ...] = option(
        FILLS, "Corner fills of the rotated views, comma-separated.", choices=FILLS, comma_list=True
    )
    checkpoint: str = option("latest", "latest | export | a training step.")
    batch_size: int = option(64, "Evaluation batch.", min=1)
    json: str = option("", "Also write the summary to this JSON file.")


def parse_sets(sets: Sequence[str]) -> dict[str, str]:
    """Returns {name: folder} from "name=folder" items; UsageError for a malformed or repeated one."""
    parsed: dict[str, str] = {}
    for item in sets:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UsageError(f"--sets: {item!r} is not name=folder")
        if name in parsed:
            raise UsageError(f"--sets: {name!r} given twice")
        parsed[name] = folder
    return parsed


def view_table(
    views: np.ndarray, order: Sequence[tuple[float, bool]], boneage: np.ndarray
) -> dict[str, Any]:
    """Returns per-view and per-subset MAEs of [views, N] predictions in `order`'s view order.

    Args:
      views: float months, one row per view.
      order: the (angle, mirrored) of each row.
      boneage: the labels; records with a negative label (unlabelled) are left out.

    Raises:
      UsageError: no labelled record, or a subset view missing from `order`.
    """
    labeled = boneage >= 0
    if not labeled.any():
        raise UsageError("the split has no labelled record: per-view MAEs need labels")
    index = {tuple(v): i for i, v in enumerate(order)}
    per_view = [
        {
            "angle": angle,
            "flip": flip,
            "mae_months": float(np.mean(np.abs(views[i] - boneage)[labeled])),
        }
        for i, (angle, flip) in enumerate(order)
    ]
    subsets = {}
    for name, members in SUBSETS.items():
        missing = [m for m in members if m not in index]
        if missing:
            raise UsageError(f"subset {name} needs views {missing} the pass did not make")
        mean = np.mean(views[[index[m] for m in members]], axis=0)
        subsets[name] = {
            "mae_months": float(np.mean(np.abs(mean - boneage)[labeled])),
            "bias_months": float(np.mean((mean - boneage)[labeled])),
        }
    return {"n": int(labeled.sum()), "views": per_view, "subsets": subsets}


def run(config: BenchConfig) -> dict[str, Any]:
    """Predicts every set's rotflip views under each fill; returns the summary."""
    import tensorflow as tf

    from boneage_tpu.core import model_dir as model_dir_lib
    from boneage_tpu.evaluate import corrections
    from boneage_tpu.evaluate.once import read_data_manifest
    from boneage_tpu.inference import restore
    from boneage_tpu.inference import runner as inference

    sets = parse_sets(config.sets)
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        loaded = restore.load_model(config.model_dir, config.checkpoint)
    baked = restore.baked_correction(loaded.model)
    order = inference.tta_views("rotflip")
    results: dict[str, Any] = {}
    for name, folder in sets.items():
        manifest, _ = read_data_manifest(folder, config.split)
        restore.check_data_compatible(
            model_dir_lib.load_derived(config.model_dir), manifest, config.model_dir
        )
        results[name] = {}
        for fill in config.fills:
            predictions = inference.predict_split(
                loaded.model,
                folder,
                config.split,
                manifest,
                image_size=restore.model_image_size(loaded),
                batch_size=config.batch_size,
                tta="rotflip",
                strategy=strategy,
                tta_fill=fill,
            )
            raw = corrections.uncorrected(predictions, baked)
            table = view_table(raw.views, order, raw.boneage)
            results[name][fill] = table
            line = "  ".join(f"{k} {v['mae_months']:.2f}" for k, v in table["subsets"].items())
            print(f"{name:>28} {fill:>10}: {line}", flush=True)
            views = "  ".join(
                f"{v['angle']:+.0f}{'F' if v['flip'] else ''} {v['mae_months']:.2f}"
                for v in table["views"]
            )
            print(f"{'':>28} {'views':>10}: {views}", flush=True)
    summary = {
        "model_dir": config.model_dir,
        "step": loaded.step,
        "split": config.split,
        "sets": sets,
        "fills": list(config.fills),
        "uncorrected": True,
        "results": results,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    _summary.write_json(summary, config.json)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m tools.benchmark_tta`."""
    return cli.main("benchmark_tta", BenchConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
