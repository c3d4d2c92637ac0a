"""The bilinear affine warp the augmentation runs on the device, in two equal formulations.

"gather" (CPU, GPU): four per-pixel gathers. "matmul" (TPU, where gathers are slow): per tile
of output rows and columns, the input window it can reach is cut out with two row/column
gathers and sampled with one-hot matmuls, chunk by chunk over the batch so that its peak
memory is bounded by WARP_CHUNK_BYTES, not the batch (`warp_transient_bytes` estimates it;
the trainer prints it once at start). One-hot selections are bfloat16, exact at a TPU's
default matmul precision. A module of its own (`augment` draws the matrices) because the two
formulations, their memory model and their chunking are one subject of ~300 lines.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf


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
# K x K window of the input, K = ceil(stretch * (TILE - 1)) + 2. The one-hot matmuls cost
# ~2 K^2 MACs per pixel (grows with the tile squared), the row gathers K / TILE^2 segments
# per pixel (shrinks with it); 8 (K = 14 at the recipes' stretch ~1.7) is the cheaper side
# of that trade at every size (BENCHMARKS.md, "Augmentation warp memory and speed").
WARP_TILE = 8
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
        + n * 2 * p * k * (4 + 2)  # float32 comparands and bf16 one-hot pixel columns
        + n * 2 * p * k * c * (2 + 4)  # the two selected columns: bf16, then float32
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
    single elements. Per 512 px image at stretch 1.7 (K = 14 at TILE 8): ~1.3e8 MACs.
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
