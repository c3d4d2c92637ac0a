"""The evaluation report's case gallery and shortcut check: heatmaps over a whole split.

One extra pass over the split (on the evaluation's strategy) computes every image's map
(`boneage_tpu.inference.heatmap`); the host turns each into its share of mass outside the hand mask and
keeps images and maps only for the k worst and k best cases, which the gallery shows.
"""

from __future__ import annotations

import base64
import dataclasses
import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from boneage_tpu.data import pipeline as data
from boneage_tpu.inference import heatmap
from boneage_tpu.inference import runner as inference

DEFAULT_SIZE = 8
GALLERY_CSS = (
    ".gallery{display:flex;flex-wrap:wrap;gap:8px} .case{margin:0;width:330px}"
    " .case img{width:320px} figcaption{font-size:0.85em}"
)


@dataclasses.dataclass
class Case:
    """One gallery entry."""

    image_id: str
    male: float
    boneage: float
    predicted: float
    outside: float  # share of the map's mass outside the hand mask
    png: bytes  # the overlay
    spread: float | None = None  # the bins head's std months (an uncertainty), else None


def select_cases(true: np.ndarray, predicted: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Returns indices of the k largest and the k smallest absolute errors among labeled rows.

    Worst first, then best first; a row is never in both (fewer than 2k labeled rows: the best
    list gets what the worst left).
    """
    labeled = np.flatnonzero(np.asarray(true) >= 0)
    error = np.abs(np.asarray(predicted)[labeled] - np.asarray(true)[labeled])
    # Stable sort by (-error, position): ties are broken by the reader's order, reproducibly.
    order = labeled[np.lexsort((labeled, -error))]
    worst = [int(i) for i in order[:k]]
    best = [int(i) for i in order[::-1] if int(i) not in set(worst)][:k]
    return worst, best


def split_maps(
    model: Any,
    dataset: tf.data.Dataset,
    keep: set[str],
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[
    dict[str, float], dict[str, float], dict[str, tuple[np.ndarray, np.ndarray, float | None]]
]:
    """Computes every real row's map of an evaluation dataset.

    Returns:
      id -> share of the map's mass outside the hand mask (NaN for an all-zero map),
      id -> share of the image outside the hand mask, and
      id -> (image uint8 [S, S, 1], map [h, w], the model's uncertainty (the bins head's std
      months, `heads.with_spread`) or None) for the ids in `keep`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    fn = heatmap.map_fn(model)

    @tf.function
    def step(inputs: Mapping[str, Any]) -> Any:
        return strategy.run(fn, args=(inputs["image"], inputs["male"]))

    outside: dict[str, float] = {}
    area: dict[str, float] = {}
    kept: dict[str, tuple[np.ndarray, np.ndarray, float | None]] = {}
    for batch in dataset:
        size = int(batch["image"].shape[0])
        if size % replicas:
            raise inference.InferenceError(
                f"evaluation batch of {size} does not split evenly over {replicas} replicas"
            )
        per_replica = size // replicas

        def replica_slice(ctx, batch=batch, per_replica=per_replica):
            start = ctx.replica_id_in_sync_group * per_replica
            return {k: batch[k][start : start + per_replica] for k in ("image", "male")}

        inputs = strategy.experimental_distribute_values_from_function(replica_slice)
        outputs = step(inputs)
        local = {
            k: np.concatenate(
                [np.asarray(v, np.float32) for v in strategy.experimental_local_results(t)]
            )
            for k, t in outputs.items()
        }
        maps, std = local["map"], local.get("std")
        images, ids = np.asarray(batch["image"]), np.asarray(batch["id"])
        for row in np.flatnonzero(np.asarray(batch["mask"]) > 0):
            image_id = ids[row].decode("utf-8")
            mask = heatmap.hand_mask(images[row])
            outside[image_id] = heatmap.outside_fraction(maps[row], mask)
            area[image_id] = float(1.0 - mask.mean())
            if image_id in keep:
                kept[image_id] = (images[row], maps[row], None if std is None else float(std[row]))
    return outside, area, kept


def shortcut_summary(
    outside: Mapping[str, float], area: Mapping[str, float], kind: str, model_dir: str
) -> dict[str, Any]:
    """Returns the metrics.json entry of the shortcut check.

    `uniform_map_outside_fraction` is what a map spread evenly over the image would score
    (the share of the image outside the mask): the number to compare with.
    """
    values = np.array([v for v in outside.values() if np.isfinite(v)], np.float64)
    return {
        "uniform_map_outside_fraction": float(np.mean(list(area.values()))) if area else None,
        "outside_hand_mass_fraction": float(values.mean()) if values.size else None,
        "outside_hand_mass_fraction_median": float(np.median(values)) if values.size else None,
        "n": int(values.size),
        "n_all_zero_maps": len(outside) - int(values.size),
        "map": kind,
        "model_dir": model_dir,
        "hand_mask": "Otsu threshold, edge borders peeled, largest region, dilated "
        f"{heatmap.MASK_DILATION}/{heatmap.MASK_SIZE} (boneage_tpu.inference.heatmap)",
    }


def build(
    model: Any,
    model_dir: str,
    data_dir: str,
    split: str,
    manifest: dict[str, Any],
    result: inference.SplitPredictions,
    *,
    image_size: int,
    batch_size: int,
    size: int = DEFAULT_SIZE,
    strategy: tf.distribute.Strategy | None = None,
    interval: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Runs the heatmap pass over a split; returns (the report's HTML section, shortcut check).

    Args:
      model: the (first) evaluated model; an ensemble's gallery shows its first member's maps.
      model_dir: that model's directory (named in the report).
      data_dir, split, manifest: the evaluated split.
      result: the evaluation's predictions (ensemble mean for ensembles), to pick the cases.
      image_size: the model's input size.
      batch_size: global evaluation batch.
      interval: (low [N], high [N], level) conformal bounds of `result`'s rows, for the titles.
      size: k, the number of worst and of best cases shown.
      strategy: where the model runs.
    """
    worst, best = select_cases(result.boneage, result.predicted, size)
    dataset = data.build_dataset(
        data_dir,
        split,
        training=False,
        batch_size=batch_size,
        image_size=image_size,
        manifest=manifest,
        cache="no",
    )
    keep = {result.ids[i] for i in worst + best}
    outside, area, kept = split_maps(model, dataset, keep, strategy)
    kind = heatmap.map_kind(model)
    summary = shortcut_summary(outside, area, kind, model_dir)

    def case(i: int) -> Case:
        image_id = result.ids[i]
        image, cam, std = kept[image_id]
        if result.spread is not None:
            # The evaluation's own spread (TTA views and ensemble members averaged).
            std = float(result.spread[i])
        bounds = None if interval is None else (interval[0][i], interval[1][i], interval[2])
        title = heatmap.title_text(image_id, float(result.predicted[i]), std, bounds)
        return Case(
            image_id=image_id,
            male=float(result.male[i]),
            boneage=float(result.boneage[i]),
            predicted=float(result.predicted[i]),
            outside=outside[image_id],
            png=heatmap.overlay_png(image, cam, title, kind),
            spread=std,
        )

    section = render_section([case(i) for i in worst], [case(i) for i in best], summary)
    return section, summary


def _card(case: Case) -> str:
    error = case.predicted - case.boneage
    image = base64.b64encode(case.png).decode("ascii")
    outside = "n/a" if not np.isfinite(case.outside) else f"{100 * case.outside:.0f} %"
    spread = f" ± {case.spread:.1f}" if case.spread is not None and np.isfinite(case.spread) else ""
    caption = (
        f"<b>{html.escape(case.image_id)}</b> · {'M' if case.male > 0.5 else 'F'}<br>"
        f"true {case.boneage:.1f} · predicted {case.predicted:.1f}{spread} · error "
        f"{error:+.1f} months<br>map mass outside hand: {outside}"
    )
    return (
        f'<figure class="case"><img alt="heatmap of {html.escape(case.image_id)}" '
        f'src="data:image/png;base64,{image}"><figcaption>{caption}</figcaption></figure>'
    )


def render_section(worst: Sequence[Case], best: Sequence[Case], summary: Mapping[str, Any]) -> str:
    """Returns the report's HTML for the shortcut check and the worst/best case galleries."""

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    shown = percent(summary["outside_hand_mass_fraction"])
    uniform = percent(summary["uniform_map_outside_fraction"])
    kind = "attention mask" if summary["map"] == "attention" else "Grad-CAM (absolute)"
    parts = [
        f"<style>{GALLERY_CSS}</style>",
        "<h2>Where the model looks</h2>",
        f'<p class="shortcut">Shortcut check: on average <b>{shown}</b> of the heatmap mass '
        f"lies outside the hand, against {uniform} for a map spread evenly over the image "
        f"({summary['n']} images; map: {html.escape(kind)} of "
        f"{html.escape(str(summary['model_dir']))}). The hand is a threshold mask "
        "(dashed outline): Otsu threshold, bright edge strips (collimation) peeled off, the "
        "largest bright region, slightly dilated. Mass on markers, borders or the film edge "
        "raises this number.</p>",
    ]
    if not worst and not best:
        parts.append("<p>No case gallery (no labeled images, or --gallery_size 0).</p>")
    for name, cases in ((f"{len(worst)} worst cases", worst), (f"{len(best)} best cases", best)):
        if cases:
            cards = "\n".join(_card(c) for c in cases)
            parts.append(
                f'<h3>{name} (absolute error)</h3>\n<div class="gallery">\n{cards}\n</div>'
            )
    return "\n".join(parts)
