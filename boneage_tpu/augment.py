"""XLA-safe on-device augmentation: one random affine per image + photometric jitter.

Runs inside the replica step on the accelerator, from the uint8 batches the host sends to
float32 in 0..255. Keras' RandomRotation/Zoom/Shear/Translation lower to
ImageProjectiveTransformV3, which has no XLA kernel (a TPU runs only XLA), so the geometry is
one composed 2x3 matrix per image applied by our own bilinear warp: per-pixel gathers on CPU
and GPU, row gathers + one-hot matmuls on TPU (`warp_affine`). Randomness is
stateless (`tf.random.stateless_*`) and keyed by (global seed, step, replica id): a run is
reproducible and every replica draws different transforms. TF's stateless kernels derive
different streams under XLA and without it, so reproducibility holds per execution mode.

Coordinates: x is the column, y the row (pointing down), both in pixels, about the centre of
the pixel grid. A matrix maps an OUTPUT pixel (x, y, 1) to the INPUT point it samples.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

# Column order of the per-image uniform draws in `sample_params`.
_PARAM_NAMES = ("angle", "shift_x", "shift_y", "zoom", "shear", "flip", "brightness")
_PARAM_NAMES += ("contrast", "gamma")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation; each image draws its values uniformly.

    Attributes:
      rotation_deg: rotation in [-r, r] degrees (positive = counter-clockwise on screen).
      shift: translation in [-s, s] x width (x) and x height (y), drawn independently.
      zoom: isotropic scale range (min, max); > 1 enlarges the content.
      shear: x-shear coefficient (tan of the shear angle) in [-k, k]. Keras 3 `RandomShear`
        reads 0.2 this way; the seed's tf_keras ImageDataGenerator read `shear_range=0.2` as
        degrees, which is practically no shear.
      flip: horizontal flip with probability 1/2.
      brightness: additive shift in [-b, b] x 255.
      contrast: factor range (min, max) applied about the per-image mean.
      gamma: exponent range (min, max) applied to the 0..1 intensities.
    """

    rotation_deg: float = 20.0
    shift: float = 0.2
    zoom: tuple[float, float] = (0.8, 1.2)
    shear: float = 0.2
    flip: bool = True
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "shift", "shear", "brightness"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("zoom", "contrast", "gamma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"AugmentConfig.{name} must be (min, max) with 0 < min <= max")

    @classmethod
    def none(cls) -> AugmentConfig:
        """Returns the disabled configuration (identity: `augment_batch` == `to_float`)."""
        return cls(0.0, 0.0, (1.0, 1.0), 0.0, False, 0.0, (1.0, 1.0), (1.0, 1.0))

    @property
    def geometric(self) -> bool:
        """Whether any geometric transform is enabled."""
        return bool(self.rotation_deg or self.shift or self.shear or self.flip) or (
            self.zoom != (1.0, 1.0)
        )

    @property
    def photometric(self) -> bool:
        """Whether any intensity jitter is enabled."""
        return bool(self.brightness) or self.contrast != (1.0, 1.0) or self.gamma != (1.0, 1.0)


def to_float(images: tf.Tensor) -> tf.Tensor:
    """Converts uint8 images to float32 in 0..255 (the no-augmentation path: eval, serving)."""
    return tf.cast(images, tf.float32)


def replica_seed(global_seed: int, step: tf.Tensor, replica_id: tf.Tensor) -> tf.Tensor:
    """Returns the stateless seed (int32 [2]) of one replica at one step.

    Args:
      global_seed: the run's seed.
      step: the training step counter (integer tensor).
      replica_id: `tf.distribute.get_replica_context().replica_id_in_sync_group`.
    """
    base = tf.constant([int(global_seed), 0x5EED], tf.int64)
    seed = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))


def sample_params(seed: tf.Tensor, batch_size: int, config: AugmentConfig) -> dict[str, tf.Tensor]:
    """Draws per-image augmentation parameters (float32 [B] each) from a stateless seed.

    Returns a dict with `angle` (radians), `shift_x`/`shift_y` (fractions of width/height),
    `zoom`, `shear`, `flip` (0 or 1), `brightness` (fraction of 255), `contrast`, `gamma`.
    """
    u = tf.random.stateless_uniform([batch_size, len(_PARAM_NAMES)], seed=seed)
    col = dict(zip(_PARAM_NAMES, tf.unstack(u, axis=1), strict=True))

    def symmetric(name: str, limit: float) -> tf.Tensor:
        return (2.0 * col[name] - 1.0) * limit

    def between(name: str, bounds: tuple[float, float]) -> tf.Tensor:
        return bounds[0] + col[name] * (bounds[1] - bounds[0])

    flip = tf.cast(col["flip"] < 0.5, tf.float32) if config.flip else tf.zeros_like(col["flip"])
    return {
        "angle": symmetric("angle", math.radians(config.rotation_deg)),
        "shift_x": symmetric("shift_x", config.shift),
        "shift_y": symmetric("shift_y", config.shift),
        "zoom": between("zoom", config.zoom),
        "shear": symmetric("shear", config.shear),
        "flip": flip,
        "brightness": symmetric("brightness", config.brightness),
        "contrast": between("contrast", config.contrast),
        "gamma": between("gamma", config.gamma),
    }


def _matrix(rows: list[list[tf.Tensor | float]], like: tf.Tensor) -> tf.Tensor:
    """Stacks 3x3 entries (tensors [B] or Python floats) into a batch of matrices [B, 3, 3]."""
    entries = [
        e if isinstance(e, tf.Tensor) else tf.fill(tf.shape(like), e) for r in rows for e in r
    ]
    return tf.reshape(tf.stack(entries, axis=1), [-1, 3, 3])


def affine_matrices(params: dict[str, tf.Tensor], height: int, width: int) -> tf.Tensor:
    """Composes the parameters into one output->input matrix per image, float32 [B, 2, 3].

    The forward transform (input content -> output) is flip, then zoom, shear, rotation and
    shift, about the image centre; the warp needs its inverse, built here factor by factor.
    """
    angle = params["angle"]
    cos, sin = tf.cos(angle), tf.sin(angle)
    inv_zoom = 1.0 / params["zoom"]
    flip_sign = 1.0 - 2.0 * params["flip"]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    tx, ty = params["shift_x"] * width, params["shift_y"] * height
    # Each factor is the inverse of the forward step; applied right to left on output points.
    uncentre_shift = _matrix([[1.0, 0.0, -cx - tx], [0.0, 1.0, -cy - ty], [0.0, 0.0, 1.0]], angle)
    unrotate = _matrix([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], angle)
    unshear = _matrix([[1.0, -params["shear"], 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], angle)
    unzoom_flip = _matrix(
        [[flip_sign * inv_zoom, 0.0, 0.0], [0.0, inv_zoom, 0.0], [0.0, 0.0, 1.0]], angle
    )
    recentre = _matrix([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]], angle)
    m = recentre @ unzoom_flip @ unshear @ unrotate @ uncentre_shift
    return m[:, :2, :]


def max_stretch(config: AugmentConfig) -> float:
    """Returns a bound on |m[r, 0]| + |m[r, 1]| of every matrix `config` can draw.

    That sum is how many input pixels one output pixel step can move along a row or a column;
    the matmul warp sizes its input windows with it.
    """
    angle = min(math.radians(config.rotation_deg), math.pi / 4)
    return (1.0 + config.shear) * (math.cos(angle) + math.sin(angle)) / config.zoom[0]


def warp_affine(
    images: tf.Tensor,
    matrices: tf.Tensor,
    method: str = "gather",
    stretch: float | None = None,
    chunk: int | None = None,
) -> tf.Tensor:
    """Bilinear warp: output (x, y) samples input `matrices @ (x, y, 1)`.

    Two formulations of the same bilinear sampling (equal to ~1e-5 of 255, also at a TPU's
    default bfloat16 matmul precision):
      "gather": four per-pixel gathers. Fastest on CPU and GPU, whose gathers are cheap.
      "matmul": no per-element gathers, for TPUs (which run them one element at a time):
        `_warp_matmul_chunk` (segment gathers and small exact one-hot matmuls), `chunk`
        images at a time so that its memory does not grow with the batch.

    Args:
      images: [B, H, W, C] (any real dtype) with static H, W, C.
      matrices: float32 [B, 2, 3] output->input pixel maps (see `affine_matrices`).
      method: "gather" or "matmul".
      stretch: "matmul" only, required: a bound on |m[r, 0]| + |m[r, 1]| for both rows r of
        every matrix (`max_stretch` of the AugmentConfig that drew them). Points beyond the
        window it implies read 0.
      chunk: "matmul" only: images warped at once (default `warp_chunk`: transients within
        `WARP_CHUNK_BYTES`).

    Returns:
      float32 [B, H, W, C]; points outside the input read 0 (the padding colour), blended
      bilinearly at the border. An identity matrix returns the input exactly.
    """
    if method == "matmul":
        if stretch is None or stretch <= 0:
            raise ValueError("warp_affine(method='matmul') needs stretch > 0 (see max_stretch)")
        return _warp_matmul(images, matrices, stretch, chunk)
    if method != "gather":
        raise ValueError(f"warp method must be 'gather' or 'matmul', got {method!r}")
    _, height, width, channels = images.shape
    batch = tf.shape(images)[0]
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32))
    # meshgrid's default "xy" indexing gives [W, H]; transpose to row-major pixel order.
    xs = tf.reshape(tf.transpose(xs), [1, -1])
    ys = tf.reshape(tf.transpose(ys), [1, -1])
    m = tf.cast(matrices, tf.float32)
    x_in = m[:, 0, 0:1] * xs + m[:, 0, 1:2] * ys + m[:, 0, 2:3]
    y_in = m[:, 1, 0:1] * xs + m[:, 1, 1:2] * ys + m[:, 1, 2:3]
    x0f, y0f = tf.floor(x_in), tf.floor(y_in)
    fx, fy = x_in - x0f, y_in - y0f
    x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
    flat = tf.reshape(images, [batch, height * width, channels])

    def corner(xi: tf.Tensor, yi: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        # Clipped indices keep the gather in bounds; `inside` zeroes their contribution.
        index = tf.clip_by_value(yi, 0, height - 1) * width + tf.clip_by_value(xi, 0, width - 1)
        values = tf.cast(tf.gather(flat, index, batch_dims=1), tf.float32)
        return values * tf.expand_dims(tf.where(inside, weight, 0.0), -1)

    out = (
        corner(x0, y0, (1.0 - fx) * (1.0 - fy))
        + corner(x0 + 1, y0, fx * (1.0 - fy))
        + corner(x0, y0 + 1, (1.0 - fx) * fy)
        + corner(x0 + 1, y0 + 1, fx * fy)
    )
    return tf.reshape(out, [batch, height, width, channels])


# Output tile side of the matmul warp: each tile of TILE x TILE output pixels reads one
# K x K window of the input, K = ceil(stretch * (TILE - 1)) + 2. The per-pixel work and
# memory grow with K (one-hot selections over the window), the number of row gathers with
# the number of tiles; 16 keeps K under the 32-pixel band at the recipes' stretch (~1.7).
WARP_TILE = 16
# Bound on the matmul warp's transient memory per chunk of images (`warp_chunk`): a chunk is
# warped at a time inside a loop, so the peak does not grow with the batch (a 1-chip v5e
# holds a whole 256-image batch on one core).
WARP_CHUNK_BYTES = 256 * 2**20
# Pixel values 0..255 and one-hots are exact in bfloat16: half the memory of float32, and a
# TPU's matmul units take them without rounding.
_SELECT_DTYPE = tf.bfloat16


@dataclasses.dataclass(frozen=True)
class WarpGeometry:
    """Sizes of the matmul warp for one image size and stretch (see `_warp_matmul`).

    Attributes:
      tile: output tile side (`WARP_TILE`).
      window: K, the input window side one tile reads.
      band: width of the aligned column blocks; a window lies within two neighbouring blocks.
      tiles: tiles per image.
    """

    tile: int
    window: int
    band: int
    tiles: int


def warp_geometry(height: int, width: int, stretch: float, tile: int = WARP_TILE) -> WarpGeometry:
    """Returns the matmul warp's tile, window and band sizes for `height` x `width` images."""
    window = int(math.ceil(stretch * (tile - 1))) + 2
    # Multiples of 8 keep the gathered rows aligned; a band of >= K - 1 columns holds any
    # window start within one block, so block and next block hold the whole window.
    band = 8 * -(-max(window - 1, 1) // 8)
    return WarpGeometry(tile, window, band, -(-height // tile) * -(-width // tile))


def warp_transient_bytes(
    height: int,
    width: int,
    channels: int,
    method: str,
    stretch: float | None = None,
    images: int = 1,
) -> int:
    """Estimates the warp's transient memory for `images` images warped at once (bytes).

    Counts every intermediate as if XLA materialised it (an upper bound: fusion keeps many in
    registers), not the uint8 input or the float32 output. The matmul warp runs `warp_chunk`
    images at a time, so its peak is this at `images=warp_chunk(...)`, whatever the batch.

    Args:
      height, width, channels: the image size.
      method: "gather" or "matmul" (`warp_affine`).
      stretch: the matmul warp's stretch (`max_stretch`); required for "matmul".
      images: how many images are warped at once.
    """
    pixels = height * width
    if method == "gather":
        # Coordinates, fractions, floors (6 float32), two int32 floors; per corner a mask,
        # an index, a weight and the gathered values; the running sum.
        per_image = pixels * (6 * 4 + 2 * 4 + 4 * (1 + 4 + 4 + 4 * channels) + 4 * channels)
        return images * per_image
    if method != "matmul" or not stretch or stretch <= 0:
        raise ValueError("warp_transient_bytes: method 'gather', or 'matmul' with stretch > 0")
    g = warp_geometry(height, width, stretch)
    n, p, k, c = g.tiles, g.tile * g.tile, g.window, channels
    padded_rows = height + 2 * k
    blocks = -(-(width + 2 * k) // g.band) + 1
    per_image = (
        padded_rows * blocks * 2 * g.band * c * 2  # bf16 paired column blocks
        + n * p * 4 * 4  # float32 coordinates x, y and their fractions
        + n * k * 2 * g.band * c * 2  # bf16 gathered band rows
        + n * 2 * g.band * k * 2  # bf16 one-hot window columns
        + n * k * k * c * 2  # bf16 windows
        + n * 2 * p * k * 2  # bf16 one-hot pixel columns (two per pixel)
        + n * 2 * p * k * c * 2  # bf16 the two selected columns
        + n * p * k * c * 4  # float32 blended along x
        + n * p * k * 4  # float32 tent weights along y
        + n * p * c * 4  # float32 tiled result before the reshape
    )
    return images * per_image


def warp_chunk(
    height: int, width: int, channels: int, stretch: float, budget: int = WARP_CHUNK_BYTES
) -> int:
    """Returns how many images the matmul warp warps at once: its transients fit `budget`."""
    per_image = warp_transient_bytes(height, width, channels, "matmul", stretch)
    return max(1, budget // per_image)


def batch_transient_bytes(
    height: int, width: int, channels: int, method: str, config: AugmentConfig, batch: int
) -> int:
    """Returns the warp's estimated peak transients for one replica's batch (bytes).

    The whole batch for "gather"; one chunk (`warp_chunk`) for "matmul". 0 when `config`
    has no geometric transform (no warp runs).
    """
    if not config.geometric:
        return 0
    if method == "gather":
        return warp_transient_bytes(height, width, channels, "gather", images=batch)
    stretch = max_stretch(config)
    chunk = min(batch, warp_chunk(height, width, channels, stretch))
    return warp_transient_bytes(height, width, channels, "matmul", stretch, images=chunk)


def _warp_matmul(
    images: tf.Tensor, matrices: tf.Tensor, stretch: float, chunk: int | None = None
) -> tf.Tensor:
    """The bilinear warp of `warp_affine` as row gathers and one-hot matmuls, chunk by chunk.

    Warps `chunk` images at a time (default `warp_chunk`) in a loop: XLA then reuses one
    chunk's buffers for the next, and the peak stays `warp_transient_bytes` of one chunk.
    """
    _, height, width, channels = images.shape
    if chunk is None:
        chunk = warp_chunk(height, width, channels, stretch)
    static_batch = images.shape[0]
    if static_batch is not None and static_batch <= chunk:
        return _warp_matmul_chunk(images, matrices, stretch)
    if static_batch is not None:
        # Equal chunks: the fewest loop steps, and at most steps - 1 padding images.
        steps = -(-static_batch // chunk)
        chunk = -(-static_batch // steps)
    batch = tf.shape(images)[0]
    steps = (batch + chunk - 1) // chunk
    extra = steps * chunk - batch
    # Zero images with identity-free (zero) matrices pad the last chunk; they are dropped.
    padded_images = tf.pad(images, [[0, extra], [0, 0], [0, 0], [0, 0]])
    padded_matrices = tf.pad(tf.cast(matrices, tf.float32), [[0, extra], [0, 0], [0, 0]])
    out = tf.map_fn(
        lambda args: _warp_matmul_chunk(args[0], args[1], stretch),
        (
            tf.reshape(padded_images, [steps, chunk, height, width, channels]),
            tf.reshape(padded_matrices, [steps, chunk, 2, 3]),
        ),
        fn_output_signature=tf.TensorSpec([chunk, height, width, channels], tf.float32),
        # One chunk at a time also without XLA: the memory bound is the point.
        parallel_iterations=1,
    )
    return tf.reshape(out, [steps * chunk, height, width, channels])[:batch]


def _warp_matmul_chunk(images: tf.Tensor, matrices: tf.Tensor, stretch: float) -> tf.Tensor:
    """Warps one chunk: see `warp_affine`'s "matmul".

    The output is cut into TILE x TILE tiles. An affine map sends a tile into a K x K input
    window. Per tile: gather the window's K rows, each a segment of two aligned column blocks
    of the (zero-padded) input; select the K window columns with a one-hot matmul; select each
    pixel's two neighbouring columns with another; blend them with the x fractions, then the
    rows with the tent weights ry = max(0, 1 - |y - row|) (two nonzeros: the bilinear weights).
    The matmuls multiply only one-hots by pixel values 0..255, all exact in bfloat16 and summed
    exactly, so they give the same result at a TPU's default (bfloat16) matmul precision as in
    float32; the fractional weights are applied in float32 elementwise ops. Nothing gathers
    single elements. Per 512 px image at stretch 1.7 (K = 27): ~4e8 MACs.
    """
    _, height, width, channels = images.shape
    batch = tf.shape(images)[0]
    g = warp_geometry(height, width, stretch)
    tile, window, band = g.tile, g.window, g.band
    tiles_y, tiles_x = -(-height // tile), -(-width // tile)
    # Output pixel coordinates, tile-major: [N tiles, P = tile * tile pixels].
    local = tf.range(tile, dtype=tf.float32)
    out_y = (
        tf.reshape(tf.range(tiles_y, dtype=tf.float32) * tile, [-1, 1, 1, 1])
        + tf.reshape(local, [1, 1, -1, 1])
        + tf.zeros([1, tiles_x, 1, tile])
    )
    out_x = (
        tf.reshape(tf.range(tiles_x, dtype=tf.float32) * tile, [1, -1, 1, 1])
        + tf.reshape(local, [1, 1, 1, -1])
        + tf.zeros([tiles_y, 1, tile, 1])
    )
    out_y = tf.reshape(out_y, [1, tiles_y * tiles_x, tile * tile])
    out_x = tf.reshape(out_x, [1, tiles_y * tiles_x, tile * tile])
    m = tf.reshape(tf.cast(matrices, tf.float32), [-1, 6, 1, 1])
    x_in = m[:, 0] * out_x + m[:, 1] * out_y + m[:, 2]  # [B, N, P]
    y_in = m[:, 3] * out_x + m[:, 4] * out_y + m[:, 5]
    # Window origin per tile in padded coordinates. Clipping moves only windows of tiles that
    # lie wholly in the padding (their samples read zeros either way).
    pad = window
    padded_width = width + 2 * pad
    blocks = -(-padded_width // band) + 1  # one spare block: every start has a next block
    padded = tf.pad(
        tf.cast(images, _SELECT_DTYPE),
        [[0, 0], [pad, pad], [pad, blocks * band - width - pad], [0, 0]],
    )
    y0 = tf.clip_by_value(
        tf.floor(tf.reduce_min(y_in, axis=-1)) + pad, 0.0, float(height + 2 * pad - window)
    )
    x0 = tf.clip_by_value(
        tf.floor(tf.reduce_min(x_in, axis=-1)) + pad, 0.0, float(padded_width - window)
    )
    # Row r, block j of `pairs` = padded row r, columns j * band .. (j + 2) * band: any window
    # starting in block j lies inside it, so one gathered segment per window row suffices.
    as_blocks = tf.reshape(padded, [batch, height + 2 * pad, blocks, band * channels])
    pairs = tf.concat([as_blocks[:, :, :-1], as_blocks[:, :, 1:]], axis=-1)
    block = tf.floor(x0 / band)
    offsets = tf.range(window, dtype=tf.float32)
    rows = y0[..., None] + offsets  # [B, N, K]
    index = tf.cast(
        tf.stack([rows, tf.broadcast_to(block[..., None], tf.shape(rows))], -1), tf.int32
    )
    segments = tf.gather_nd(pairs, index, batch_dims=1)  # [B, N, K, 2 band * C]
    segments = tf.reshape(segments, [batch, -1, window, 2 * band, channels])
    columns = tf.range(2 * band, dtype=tf.float32)
    start = x0 - block * band  # window start inside the segment, 0 .. band - 1
    select = tf.cast(
        tf.equal(columns[None, None, :, None], start[..., None, None] + offsets), _SELECT_DTYPE
    )  # [B, N, 2 band, K]
    windows = tf.einsum("bnkwc,bnwj->bnkjc", segments, select)  # [B, N, K, K, C], exact

    def split(coordinate: tf.Tensor, origin: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # Window index of the lower neighbour and the fraction. The fraction is taken first,
        # as in the gather warp: the integer part is then exact in float32.
        whole = tf.floor(coordinate)
        return whole + pad - origin[..., None], coordinate - whole

    left, fx = split(x_in, x0)  # [B, N, P]
    top, fy = split(y_in, y0)
    # Each pixel's columns `left` and `left + 1` of its window (all zero outside it).
    neighbours = left[..., None] + tf.constant([0.0, 1.0])  # [B, N, P, 2]
    pick = tf.cast(tf.equal(neighbours[..., None], offsets), _SELECT_DTYPE)  # [B, N, P, 2, K]
    pick = tf.reshape(pick, [batch, -1, 2 * tile * tile, window])
    picked = tf.einsum("bnqj,bnijc->bnqic", pick, windows)  # [B, N, 2P, K, C], exact
    picked = tf.reshape(tf.cast(picked, tf.float32), [batch, -1, tile * tile, 2, window, channels])
    fx = fx[..., None, None]
    along_x = (1.0 - fx) * picked[:, :, :, 0] + fx * picked[:, :, :, 1]  # [B, N, P, K, C]
    ry = tf.nn.relu(1.0 - tf.abs(top[..., None] - offsets + fy[..., None]))  # [B, N, P, K]
    out = tf.reduce_sum(ry[..., None] * along_x, axis=-2)  # [B, N, P, C]
    out = tf.reshape(out, [batch, tiles_y, tiles_x, tile, tile, channels])
    out = tf.reshape(
        tf.transpose(out, [0, 1, 3, 2, 4, 5]), [batch, tiles_y * tile, tiles_x * tile, channels]
    )
    return out[:, :height, :width, :]


def adjust_intensity(images: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
    """Applies gamma, contrast (about the image mean) and brightness; float32 0..255 out.

    Args:
      images: [B, H, W, C] in 0..255, any real dtype.
      params: from `sample_params` (uses `gamma`, `contrast`, `brightness`).
    """

    def per_image(name: str) -> tf.Tensor:
        return tf.reshape(params[name], [-1, 1, 1, 1])

    # exp(g * log x) is twice as fast as tf.pow under XLA on CPU; the epsilon keeps log finite
    # at black pixels (they map to ~0.004 grey levels).
    x = tf.exp(per_image("gamma") * tf.math.log(tf.cast(images, tf.float32) / 255.0 + 1e-6))
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * per_image("contrast") + mean + per_image("brightness")
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def augment_batch(
    images: tf.Tensor,
    seed: tf.Tensor,
    config: AugmentConfig = AugmentConfig(),
    warp: str = "gather",
) -> tf.Tensor:
    """Randomly augments a batch on the device; XLA-compilable, stateless.

    Args:
      images: uint8 [B, H, W, C] with static H, W, C (B may be dynamic).
      seed: int32/int64 [2], e.g. `replica_seed(global_seed, step, replica_id)`.
      config: the ranges; `AugmentConfig.none()` returns `to_float(images)` exactly.
      warp: `warp_affine`'s method: "gather" (CPU, GPU) or "matmul" (TPU).

    Returns:
      float32 [B, H, W, C] in 0..255.
    """
    if not (config.geometric or config.photometric):
        return to_float(images)
    _, height, width, _ = images.shape
    params = sample_params(seed, tf.shape(images)[0], config)
    # Warp first: gathering the 1-byte source pixels beat gathering jittered floats (~3.9k vs
    # ~2.9k img/s at 299 px on 2 CPU cores), and the warp's black fill then gets the same
    # jitter as the host's black padding.
    if config.geometric:
        matrices = affine_matrices(params, height, width)
        out = warp_affine(images, matrices, warp, max_stretch(config) if warp == "matmul" else None)
    else:
        out = images
    if config.photometric:
        return adjust_intensity(out, params)
    return to_float(out)
