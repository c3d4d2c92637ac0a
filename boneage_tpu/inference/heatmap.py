"""Where the model looks: Grad-CAM or attention maps, overlay PNGs, a hand mask, a shortcut check.

The map of an image is, for a model trained with `--attention`, its learned attention mask
(the weights its pooling applies), else Grad-CAM on the last convolutional block: the backbone
sub-model's output features A_k weighted by the spatial mean of d(months)/dA_k. Bone age is a
regression, so features that pull the prediction down are as informative as those that push it
up: the map is the absolute value |sum_k alpha_k A_k| rather than Grad-CAM's ReLU (with a
linear head on average-pooled features, it is the magnitude of each cell's contribution to the
predicted months).

The shortcut check is the fraction of a map's mass outside the hand: a model reading the L/R
marker, the collimation border or the film edge puts mass there. The hand mask is a simple
threshold mask, computed on the image as the model saw it, at `MASK_SIZE` px:

1. Otsu's threshold over the image (the zero padding of the square fit left out);
2. rows and columns at the image's edges in which at least a share `BORDER_FILL` of the pixels
   pass the threshold are collimation borders (bright strips) and are peeled off, from the
   outside in (a hand never fills 80 % of a row);
3. the largest 4-connected bright region is the hand (markers and text are small, separate
   regions), its holes are filled, and it is dilated by `MASK_DILATION` px so that fewer of
   the map's coarse cells along the hand's outline count as outside.

The mask is a heuristic (on the RSNA images it cuts thin finger tips and takes a whole small
film inside a dark frame for the hand): the number is for comparing models on the same data.

One module of some 480 lines because the maps, the hand mask and the shortcut check are
one measurement, shared by predict and the gallery.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from matplotlib import cm, colormaps, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from boneage_tpu.core import guard
from boneage_tpu.core.config import join
from boneage_tpu.core.errors import Error
from boneage_tpu.modeling import heads

MASK_SIZE = 64
BORDER_FILL = 0.8
MASK_DILATION = 2
_OVERLAY_INCHES = (3.2, 2.95)
_OVERLAY_ALPHA = 0.7  # opacity of the map's maximum; low values fade out so the image shows
_OVERLAY_DPI = 100


class HeatmapError(Error, ValueError):
    """The model has no map to show (no convolutional feature map); the message is one line."""


def _is_feature_map(tensor: Any) -> bool:
    shape = tuple(tensor.shape)
    return len(shape) == 4 and shape[-1] is not None and shape[-1] > 1


def _outer_output(layer: keras.layers.Layer) -> Any:
    # A nested model's `.output` is its own graph's tensor; the node where the outer model
    # calls it holds the tensor that the outer graph can use.
    return layer._inbound_nodes[-1].output_tensors[0]


def feature_tensor(model: keras.Model) -> Any:
    """Returns the last convolutional block's output inside `model`'s graph.

    That is the output of the backbone (the nested model with a 4-D output, whatever its name),
    else the last layer with a multi-channel 4-D output.

    Raises:
      HeatmapError: the model has no 4-D feature map.
    """
    nested = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and _is_feature_map(_outer_output(layer))
    ]
    if nested:
        return _outer_output(nested[-1])
    flat = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer) and _is_feature_map(layer.output)
    ]
    if not flat:
        raise HeatmapError(f"model {model.name} has no convolutional feature map to explain")
    return flat[-1].output


def attention_tensor(model: keras.Model) -> Any | None:
    """Returns the attention mask [B, h, w, 1] that the model's masked pooling uses, or None."""
    from boneage_tpu.modeling.model import MaskedAveragePooling

    for layer in model.layers:
        if isinstance(layer, MaskedAveragePooling):
            return layer._inbound_nodes[-1].input_tensors[1]
    return None


def split_outputs(outputs: Any) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Returns (months [B], uncertainty [B] or None) from a model's output structure.

    A plain tensor is months; a dict gives "months" and, when present, "std" or
    "uncertainty"; a list or tuple gives months first and the uncertainty second.
    """
    std = None
    if isinstance(outputs, Mapping):
        if "months" not in outputs:
            raise HeatmapError(f"the model's outputs {sorted(outputs)} have no 'months'")
        months = outputs["months"]
        std = outputs.get("std", outputs.get("uncertainty"))
    elif isinstance(outputs, list | tuple):
        months = outputs[0]
        std = outputs[1] if len(outputs) > 1 else None
    else:
        months = outputs
    months = tf.reshape(tf.cast(months, tf.float32), [-1])
    if std is not None:
        std = tf.reshape(tf.cast(std, tf.float32), [-1])
    return months, std


def map_kind(model: keras.Model) -> str:
    """Returns "attention" for a model with an attention mask, else "grad-cam"."""
    return "attention" if attention_tensor(model) is not None else "grad-cam"


def _outputs(model: keras.Model) -> Any:
    """The tensors a map pass reports: months, and the bins head's std months when it has one.

    `heads.with_spread` is the one owner of the bins head's spread (None for regression).
    """
    spread = heads.with_spread(model)
    return model.output if spread is None else spread.output


def map_fn(model: keras.Model) -> Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns fn(images [B,S,S,1] 0..255, male [B]) -> {"map" [B,h,w] >= 0, "months" [B],
    and "std" [B] when the model outputs an uncertainty (the bins head's spread)}.

    Raises:
      HeatmapError: the model has no convolutional feature map.
    """
    attention = attention_tensor(model)
    outputs_of = _outputs(model)
    if attention is not None:
        probe = keras.Model(model.input, [attention, outputs_of])
    else:
        features = feature_tensor(model)
        # Two stages with the features watched in between: the gradient of the outputs with
        # respect to an output of one combined model is None in Keras 3 when the backbone's
        # last layer has no weights (e.g. VGG19's pooling).
        front = keras.Model(model.input, features)
        names = [tensor.name for tensor in model.inputs]  # "image", "male"
        back = keras.Model([features, *model.inputs], outputs_of)

    def run(images: tf.Tensor, male: tf.Tensor) -> dict[str, tf.Tensor]:
        inputs = {"image": tf.cast(images, tf.float32), "male": tf.cast(male, tf.float32)}
        if attention is not None:
            mask, outputs = probe(inputs, training=False)
            months, std = split_outputs(outputs)
            cam = tf.cast(mask[..., 0], tf.float32)
        else:
            with tf.GradientTape() as tape:
                maps = front(inputs, training=False)
                tape.watch(maps)
                outputs = back([maps, *(inputs[n] for n in names)], training=False)
                months, std = split_outputs(outputs)
                # Each image's months depend only on its own features: one gradient serves all.
                target = tf.reduce_sum(months)
            grads = tf.cast(tape.gradient(target, maps), tf.float32)
            alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = tf.abs(tf.reduce_sum(tf.cast(maps, tf.float32) * alpha, axis=-1))
        result = {"map": cam, "months": months}
        if std is not None:
            result["std"] = std
        return result

    return run


def resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resizes maps [B, h, w] to [B, size, size], clipped to >= 0."""
    resized = tf.image.resize(np.asarray(maps, np.float32)[..., None], (size, size))
    return np.maximum(resized.numpy()[..., 0], 0.0)


def _downsample(images: np.ndarray, size: int) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim == 4:
        x = x[..., 0]
    return tf.image.resize(x[..., None], (size, size), method="area").numpy()[..., 0]


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in 0..255 (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=256, range=(0.0, 256.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    omega = np.cumsum(p)
    mu = np.cumsum(p * edges[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0)
    return float(edges[int(np.argmax(between))] + 0.5)


def _peel_borders(fg: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    fg = fg.copy()
    box = fg[rows, cols]  # a view: peeling writes through to fg
    for axis in (0, 1):
        for reverse in (False, True):
            lines = range(box.shape[axis] - 1, -1, -1) if reverse else range(box.shape[axis])
            for i in lines:
                line = box[i] if axis == 0 else box[:, i]
                if line.mean() < BORDER_FILL:
                    break
                line[:] = False
    return fg


def _largest_component(fg: np.ndarray) -> np.ndarray:
    """The largest 4-connected True region of a 2-D mask (min-label propagation)."""
    h, w = fg.shape
    n = h * w
    labels = np.where(fg.ravel(), np.arange(n), n)
    while True:
        grid = np.pad(labels.reshape(h, w), 1, constant_values=n)
        neighbours = np.minimum.reduce(
            [grid[1:-1, 1:-1], grid[:-2, 1:-1], grid[2:, 1:-1], grid[1:-1, :-2], grid[1:-1, 2:]]
        ).ravel()
        new = np.where(fg.ravel(), neighbours, n)
        # Pointer jumping: a label is a pixel index of the same region, so following it
        # shortcuts long paths (fingers) in a few rounds.
        padded = np.append(new, n)
        new = np.minimum(new, padded[new])
        if np.array_equal(new, labels):
            break
        labels = new
    counts = np.bincount(labels[labels < n], minlength=n)
    if not counts.any():
        return np.zeros_like(fg)
    return (labels == int(np.argmax(counts))).reshape(h, w)


def _fill_holes(region: np.ndarray) -> np.ndarray:
    outside = _background_reaching_edge(~region)
    return ~outside


def _background_reaching_edge(bg: np.ndarray) -> np.ndarray:
    """Background pixels connected to the frame (flood fill from the edges)."""
    reach = np.zeros_like(bg)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = bg[0, :], bg[-1, :], bg[:, 0], bg[:, -1]
    while True:
        grown = reach.copy()
        grown[1:, :] |= reach[:-1, :]
        grown[:-1, :] |= reach[1:, :]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= bg
        if np.array_equal(grown, reach):
            return reach
        reach = grown


def _dilate(region: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        grown = region.copy()
        grown[1:, :] |= region[:-1, :]
        grown[:-1, :] |= region[1:, :]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        region = grown
    return region


def hand_mask(image: np.ndarray, size: int = MASK_SIZE) -> np.ndarray:
    """Returns the hand region bool [size, size] of one image uint8 [S, S] or [S, S, 1].

    See the module docstring for the rule. An image with no bright region gives an empty mask.
    """
    full = np.asarray(image)
    if full.ndim == 3:
        full = full[..., 0]
    small = _downsample(full[None], size)[0]
    # The square fit pads with exact zeros: rows and columns without any content are padding.
    content_rows = np.flatnonzero((full > 0).any(axis=1))
    content_cols = np.flatnonzero((full > 0).any(axis=0))
    if not content_rows.size:
        return np.zeros((size, size), bool)
    scale = size / full.shape[0]
    rows = slice(int(content_rows[0] * scale), int(np.ceil((content_rows[-1] + 1) * scale)))
    cols = slice(int(content_cols[0] * scale), int(np.ceil((content_cols[-1] + 1) * scale)))
    threshold = _otsu(small[rows, cols])
    fg = np.zeros((size, size), bool)
    fg[rows, cols] = small[rows, cols] > threshold
    fg = _peel_borders(fg, rows, cols)
    region = _largest_component(fg)
    if not region.any():
        return region
    return _dilate(_fill_holes(region), MASK_DILATION)


def outside_fraction(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Returns the share of a map's mass [h, w] outside `mask` [M, M]; NaN for an all-zero map."""
    resized = resize_maps(heatmap[None], mask.shape[0])[0]
    total = float(resized.sum())
    if not np.isfinite(total) or total <= 0:
        return float("nan")
    return float(resized[~mask].sum() / total)


def overlay_png(
    image: np.ndarray, heatmap: np.ndarray, title: str, kind: str = "grad-cam"
) -> bytes:
    """Draws the map over the image as the model saw it, the hand mask outlined; returns PNG.

    Args:
      image: uint8 [S, S] or [S, S, 1], the model's input.
      heatmap: the map [h, w] (any positive scale; shown relative to its maximum).
      title: the figure title (id and predicted months).
      kind: "grad-cam" or "attention", named in the colour bar.
    """
    pixels = np.asarray(image)
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    size = pixels.shape[0]
    cam = resize_maps(np.asarray(heatmap)[None], size)[0]
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else cam
    fig = Figure(figsize=_OVERLAY_INCHES, dpi=_OVERLAY_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.01, 0.8, 0.85))
    ax.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    colours = colormaps["jet"](cam)
    colours[..., 3] = _OVERLAY_ALPHA * cam
    ax.imshow(colours, interpolation="bilinear")
    shown = cm.ScalarMappable(colors.Normalize(0.0, 1.0), "jet")
    mask = hand_mask(pixels)
    ax.contour(
        np.linspace(0, size - 1, mask.shape[1]),
        np.linspace(0, size - 1, mask.shape[0]),
        mask.astype(np.float32),
        levels=[0.5],
        colors="white",
        linewidths=0.8,
        linestyles="dashed",
    )
    ax.set_axis_off()
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    bar = fig.add_axes((0.84, 0.08, 0.04, 0.72))
    fig.colorbar(shown, cax=bar).set_label(f"{kind} (relative)", fontsize=7)
    bar.tick_params(labelsize=6)
    # parse_math=False: a `$` in an id or file name is text, not the start of mathtext.
    fig.suptitle(title, fontsize=8, y=0.995, parse_math=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_OVERLAY_DPI)
    return buf.getvalue()


def title_text(
    image_id: str,
    months: float,
    std: float | None = None,
    interval: tuple[float, float, float] | None = None,
) -> str:
    """Returns an overlay title: id, predicted months (years), the spread and interval if any.

    Args:
      image_id: the image's name.
      months: the prediction.
      std: the bins head's per-image standard deviation (months), shown as "± std".
      interval: (low, high, level) of a conformal interval (`inference.intervals`), shown on a
        line of its own: unlike the spread, its coverage is calibrated.
    """
    spread = f" ± {std:.1f}" if std is not None and np.isfinite(std) else ""
    # Control characters and undecodable bytes of a file name are escaped (matplotlib cannot
    # draw them); `$` stays text: overlay_png turns mathtext off.
    text = (
        f"{guard.printable(image_id)}\npredicted {months:.1f}{spread} months ({months / 12:.1f} y)"
    )
    if interval is not None:
        low, high, level = interval
        text += f"\n{level:.0%} interval {low:.1f}–{high:.1f} months"
    return text


def file_names(ids: Sequence[str], sources: Sequence[str] | None = None) -> list[str]:
    """Returns one distinct PNG name per image, by construction.

    An id that occurs once keeps its name (`<id>.png`); every image of a repeated id (same
    stem in other folders) is named `<id>-<hash>.png` with a stable short hash of its full
    source path, so names do not depend on the order of the inputs, and a hash is lengthened
    in the rare case that a name still clashes (with another id that looks like `<id>-<hash>`).

    Args:
      ids: the images' ids.
      sources: their full paths (default: the ids), which the hashes are taken of.
    """
    sources = list(ids) if sources is None else list(sources)
    counts: dict[str, int] = {}
    for image_id in ids:
        counts[image_id] = counts.get(image_id, 0) + 1
    # The same file given twice is hashed with its repeat number: still one name each.
    seen: dict[str, int] = {}
    keys = []
    for src in sources:
        seen[src] = seen.get(src, 0) + 1
        keys.append(src if seen[src] == 1 else f"{src}\0{seen[src]}")
    for digits in range(8, 65, 8):
        names = [
            f"{guard.printable(image_id)}.png"
            if counts[image_id] == 1
            else f"{guard.printable(image_id)}-{hashlib.sha256(os.fsencode(src)).hexdigest()[:digits]}.png"
            for image_id, src in zip(ids, keys, strict=True)
        ]
        if len(set(names)) == len(names):
            return names
    raise HeatmapError("heatmap file names collide even with a full hash")


def write_overlays(
    model: keras.Model,
    images: np.ndarray,
    male: np.ndarray,
    ids: Sequence[str],
    months: Sequence[float],
    output_dir: str,
    *,
    batch_size: int = 16,
    names: Sequence[str] | None = None,
    fn: Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]] | None = None,
    intervals: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> list[str]:
    """Writes one overlay PNG per image into `output_dir` (local or gs://); returns the paths.

    Args:
      model: the restored model.
      images: its inputs uint8 [N, S, S, 1], as prepared for prediction.
      male: float32 [N].
      ids: names of the images (the PNG file names).
      months: the predictions shown in the titles (e.g. with flip TTA).
      output_dir: the folder, created when missing.
      batch_size: images per map computation.
      names: the PNG file names (default `file_names(ids)`).
      fn: `tf.function(map_fn(model))` to reuse (chunked callers trace it once).
      intervals: (low [N], high [N], level) conformal bounds shown in the titles.
    """
    run = fn or tf.function(map_fn(model))
    kind = map_kind(model)
    tf.io.gfile.makedirs(output_dir)
    paths = [join(output_dir, name) for name in (names or file_names(ids))]
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        out = run(tf.constant(images[start:stop]), tf.constant(male[start:stop], tf.float32))
        maps = out["map"].numpy()
        std = out["std"].numpy() if "std" in out else [None] * len(maps)
        for j, i in enumerate(range(start, min(stop, len(images)))):
            spread = None if std[j] is None else float(std[j])
            bounds = None
            if intervals is not None:
                bounds = (float(intervals[0][i]), float(intervals[1][i]), intervals[2])
            title = title_text(ids[i], float(months[i]), spread, bounds)
            with tf.io.gfile.GFile(paths[i], "wb") as f:
                f.write(overlay_png(images[i], maps[j], title, kind))
    return paths
