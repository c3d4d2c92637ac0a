"""Loading, normalising, resizing and encoding hand radiographs (converter and predict share it).

Every input (PNG 8/16-bit, palette, RGB(A), LA, JPEG, DICOM) becomes an 8-bit single-channel
image, upright: an EXIF orientation tag (phone photos of films) is applied. The converter and
the predict tool both decode here; the SavedModel signature decodes with `tf.io.decode_image`,
which ignores EXIF, so serve it upright images. 16-bit images are scaled by the bit depth their
values actually use (12-bit data exported from DICOM into a 16-bit PNG fills 0..255, not 0..15).

Memory: an image is refused before its pixels are decoded when they would take more than
`MAX_DECODED_BYTES` (width x height x bytes per pixel of its mode), which bounds what one
converter worker holds, whatever the bit depth or channel count.

`prepare` also checks that an image is plausible as a radiograph (`plausibility_problem`: not
tiny, not blank, not noise); the converter skips implausible images, `predict` refuses them
unless forced.

Resizing always makes the longest side exactly `size` (the aspect ratio is kept), upsampling
small images too, so every record and every prediction input follows one scale convention:
"longest side = image_size". With `crop="hand"` the decoded full-resolution image is first cut
to the hand's box (`boneage_tpu.data.crop`); converter and predict crop with the same call.

Importing this module does not import TensorFlow (only `read_bytes` needs it).

One module of some 450 lines because every input kind's decoding must stay beside the
others: the converter and predict must prepare pixels identically.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from boneage_tpu.core import guard
from boneage_tpu.core.errors import Error
from boneage_tpu.data import crop as crop_lib

ENCODINGS = ("jpeg", "png", "raw")  # Same values as schema.ENCODINGS (kept TF-free here).
PNG_COMPRESS_LEVEL = 6
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# The errors Pillow raises for corrupt or truncated data (besides UnidentifiedImageError).
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
# Decoded bytes one image may take (an 8-bit 16k x 16k image); a full-size RSNA PNG takes ~8 MB,
# a 16-bit 3k x 3k DICOM 18 MB. Pillow's own bomb limit counts pixels only: a 13000 x 13000
# 16-bit PNG passed it and cost ~2.9 GB per worker.
MAX_DECODED_BYTES = 256 * 2**20
# Bytes one input file may have: a compressed image is smaller than its pixels, and an
# uncompressed DICOM is about their size.
MAX_FILE_BYTES = MAX_DECODED_BYTES
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3}
_MODE_BYTES.update({"RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "HSV": 3})
_MODE_BYTES.update({mode: 2 for mode in _SIXTEEN_BIT_MODES})
# Plausibility of a radiograph (see `plausibility_problem`).
_EXIF_ORIENTATION = 0x0112
_CHECK_SIDE = 256  # The content checks look at about this many pixels per side (cheap).
MIN_SIDE = 32  # Source pixels of the shorter side; RSNA images have 1000+.
MIN_STD = 2.0  # Grey levels: below, the image is blank (one value plus compression noise).
MIN_NEIGHBOUR_CORRELATION = 0.3  # X-rays are smooth at the stored size; noise is not.
# Content: pixels more than CONTENT_LEVELS grey levels from the median (the background). On
# 3,146 RSNA training images (every 4th, 256 px) the smallest share was 6.8 %, the smallest
# std 6.6 and the smallest neighbour correlation 0.74.
CONTENT_LEVELS = 8
MIN_CONTENT = 0.02


class ImageError(Error, ValueError):
    """An image that cannot be used; the message is the human-readable skip reason."""


class ImplausibleImageError(ImageError):
    """A decodable image that does not look like a radiograph (tiny, blank or noise)."""


def decode_grayscale(data: bytes, name: str = "") -> np.ndarray:
    """Decodes PNG, JPEG or DICOM bytes into an 8-bit single-channel image.

    Args:
      data: the file's bytes.
      name: the file name; a `.dcm` extension selects DICOM when the bytes have no magic.

    Returns:
      A uint8 array of shape (height, width).

    Raises:
      ImageError: the bytes are empty, corrupt, truncated or in an unsupported format.
    """
    return np.array(_decode_pil(data, name))


def read_grayscale(path: str) -> np.ndarray:
    """Reads an image file (local or gs://, through `tf.io.gfile`) as uint8 (height, width)."""
    return decode_grayscale(read_bytes(path), name=path)


def read_bytes(path: str) -> bytes:
    """Returns a file's bytes (local, or gs:// etc. through `tf.io.gfile`), checked first.

    `guard.read_file` stats the opened file before reading it: a FIFO, a device, a socket, a
    folder or a file above `MAX_FILE_BYTES` raises `ImageError` without a byte read (no hang,
    no memory blow-up), as does a missing or unreadable file.
    """
    try:
        return guard.read_file(path, MAX_FILE_BYTES, "an image file")
    except guard.InputFileError as e:
        raise ImageError(str(e)) from e


def _one_line(error: object) -> str:
    """An error's text on one line (reasons go into one-line reports and summary tables)."""
    return " ".join(str(error).split())[:300]


def resize_longest_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes so that the longest side is exactly `size`, keeping the aspect ratio.

    Downscaling is antialiased: an integer box reduction (`Image.reduce`) to less than twice the
    target, then Pillow's bilinear filter, which widens with the scale factor (a triangle
    filter; cheap here because the remaining factor is small). Smaller images are upsampled
    bilinearly.
    """
    return np.array(_resize_pil(Image.fromarray(_check_uint8_2d(image), "L"), size))


def target_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Returns the (height, width) that `resize_longest_side` gives for an input shape."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if width >= height:
        return max(1, round(height * size / width)), size
    return size, max(1, round(width * size / height))


def encode(image: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """Encodes a uint8 (height, width) image as `jpeg`, `png` or `raw` (row-major bytes)."""
    return _encode_pil(Image.fromarray(_check_uint8_2d(image), "L"), encoding, jpeg_quality)


def decode(data: bytes, encoding: str, height: int, width: int) -> np.ndarray:
    """Decodes what `encode` wrote back to a uint8 (height, width) array, checking the shape."""
    if encoding == "raw":
        if len(data) != height * width:
            raise ImageError(f"raw image has {len(data)} bytes, expected {height}x{width}")
        return np.frombuffer(data, np.uint8).reshape(height, width).copy()
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    image = decode_grayscale(data)
    if image.shape != (height, width):
        raise ImageError(f"decoded {encoding} image is {image.shape}, expected {(height, width)}")
    return image


def prepare(
    data: bytes,
    name: str,
    size: int,
    encoding: str,
    jpeg_quality: int = 95,
    *,
    warn: Callable[[str], None] | None = None,
    crop: str = "none",
    crop_margin: float = crop_lib.DEFAULT_MARGIN,
    on_crop_fallback: Callable[[str], None] | None = None,
) -> tuple[bytes, int, int]:
    """Decodes, checks, crops, resizes and encodes one input file: the converter's per-image work.

    Gives exactly `encode(resize_longest_side(decode_grayscale(data, name), size), ...)` (with
    the decoded image first cut to `crop.hand_box` under `crop="hand"`) but stays in Pillow
    throughout (no NumPy round trips), which keeps the converter decode-bound.

    Args:
      data: the file's bytes.
      name: the file name (selects DICOM by extension; named in reasons).
      size: longest side of the stored image.
      encoding: jpeg | png | raw.
      jpeg_quality: JPEG quality.
      warn: called with the reason when the image is implausible (`plausibility_problem`)
        instead of raising; None raises `ImplausibleImageError`.
      crop: none | hand (`boneage_tpu.data.crop`), applied before the resize.
      crop_margin: the hand box's enlargement about its centre.
      on_crop_fallback: called with the reason when the hand crop found no hand and kept the
        whole image (the converter counts these; predict warns).

    Returns:
      (encoded bytes, height, width) of the stored image.

    Raises:
      ImageError: the input cannot be decoded or is implausible (`ImplausibleImageError`).
    """
    source = _decode_pil(data, name)
    cropped, fallback = crop_lib.crop_image(source, crop, crop_margin)
    if fallback and on_crop_fallback is not None:
        on_crop_fallback(fallback)
    image = _resize_pil(cropped, size)
    # The source's own size: "too small" is about the file's resolution, not the crop's.
    problem = plausibility_problem(np.asarray(image), source.size)
    if problem and warn is None:
        raise ImplausibleImageError(problem)
    if problem:
        warn(problem)
    return _encode_pil(image, encoding, jpeg_quality), image.height, image.width


def prepare_file(
    path: str,
    size: int,
    encoding: str,
    jpeg_quality: int = 95,
    crop: str = "none",
    crop_margin: float = crop_lib.DEFAULT_MARGIN,
) -> tuple[bytes, int, int]:
    """`prepare` on a file read through `tf.io.gfile`; a missing file raises `ImageError`."""
    return prepare(
        read_bytes(path), path, size, encoding, jpeg_quality, crop=crop, crop_margin=crop_margin
    )


def plausibility_problem(image: np.ndarray, source_size: tuple[int, int] | None = None) -> str:
    """Returns why an 8-bit grayscale image cannot be a hand radiograph, or "" if it may be one.

    A coarse filter for inputs that would still get a confident bone age, not a hand detector:
    too small (shorter side of the source below `MIN_SIDE`), near-constant (blank), no spatial
    structure (noise), or almost no pixels that differ from the background (a blank image with
    a small mark).

    Args:
      image: uint8 (height, width), at the stored size (the content checks are cheap there).
      source_size: (width, height) of the file's image; default the image's own.
    """
    width, height = source_size or (image.shape[1], image.shape[0])
    if min(width, height) < MIN_SIDE:
        return f"image too small for a radiograph: {width}x{height} px (needs >= {MIN_SIDE})"
    stride = max(1, max(image.shape) // _CHECK_SIDE)
    image = image[::stride, ::stride]
    values = image.astype(np.float32)
    std = float(values.std())
    if std < MIN_STD:
        return f"near-constant image (std {std:.1f} grey levels): no radiograph content"
    centred = values - values.mean()
    pairs = (centred[:, 1:] * centred[:, :-1]).mean() + (centred[1:] * centred[:-1]).mean()
    correlation = float(pairs / 2 / std**2)
    if correlation < MIN_NEIGHBOUR_CORRELATION:
        return f"no image structure (neighbour correlation {correlation:.2f}): looks like noise"
    counts = np.bincount(image.ravel(), minlength=256)
    background = int(np.searchsorted(np.cumsum(counts), image.size / 2))  # The median level.
    low, high = max(background - CONTENT_LEVELS, 0), background + CONTENT_LEVELS + 1
    content = 1.0 - float(counts[low:high].sum() / image.size)
    if content < MIN_CONTENT:
        return f"no hand-like content (only {content:.1%} of the pixels differ from the background)"
    return ""


def _check_uint8_2d(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 (height, width) image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _decode_pil(data: bytes, name: str) -> Image.Image:
    """Decodes any supported input into a Pillow image of mode L."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    is_dicom = data[128:132] == b"DICM" or (
        name.lower().endswith(".dcm") and not data.startswith((_PNG_MAGIC, _JPEG_MAGIC))
    )
    if is_dicom:
        return Image.fromarray(_decode_dicom(data), "L")
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 Mpx; `_check_decoded_size` is the limit that holds here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        _check_decoded_size(image.width, image.height, image.mode)
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)  # Upright, as a viewer shows it.
    except UnidentifiedImageError as e:
        raise ImageError("not a PNG, JPEG or DICOM image (unrecognised data)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from e
    except MemoryError as e:
        raise ImageError("out of memory decoding the image") from e
    except _PIL_DECODE_ERRORS as e:
        raise ImageError(f"corrupt or truncated image: {_one_line(e)}") from e
    return _to_grayscale(image)


def _check_decoded_size(width: int, height: int, mode: str, bytes_per_pixel: int = 0) -> None:
    """Refuses an image whose decoded pixels would exceed `MAX_DECODED_BYTES`."""
    decoded = width * height * (bytes_per_pixel or _MODE_BYTES.get(mode, 4))
    if decoded > MAX_DECODED_BYTES:
        raise ImageError(
            f"image too large: {width}x{height} {mode} decodes to {decoded / 2**20:.0f} MB, "
            f"above the {MAX_DECODED_BYTES / 2**20:.0f} MB per-image limit"
        )


def _to_grayscale(image: Image.Image) -> Image.Image:
    """Converts a decoded Pillow image of any mode to 8-bit mode L."""
    mode = image.mode
    if mode == "L":
        return image
    if mode == "P":
        return _palette_to_grayscale(image)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return Image.fromarray(_sixteen_to_eight(np.asarray(image), mode), "L")
    if mode in ("LA", "La"):
        return image.getchannel(0)  # Alpha is dropped, not composited: X-rays have none.
    if mode == "PA":
        return image.convert("RGBA").convert("L")
    if mode == "F":
        raise ImageError("floating-point images are not supported")
    try:
        return image.convert("L")  # RGB, RGBA, CMYK, YCbCr, 1: ITU-R 601 luma.
    except ValueError as e:
        raise ImageError(f"cannot convert a {mode} image to grayscale") from e


def _palette_to_grayscale(image: Image.Image) -> Image.Image:
    """Maps palette indices to luma through a 256-entry table (same values as convert('L'))."""
    palette = np.asarray(image.getpalette("RGB") or [], np.int64).reshape(-1, 3)[:256]
    # Pillow's own integer luma (L24), so the result equals image.convert("L") bit for bit,
    # at a third of its cost.
    luma = (palette[:, 0] * 19595 + palette[:, 1] * 38470 + palette[:, 2] * 7471 + 0x8000) >> 16
    return image.point(luma.tolist() + [0] * (256 - len(luma)), "L")


def significant_bits(values: np.ndarray) -> int:
    """The bit depth that 16-bit pixel values actually use: that of their maximum, at least 8.

    PNG has no reliable field for it (sBIT, when present, describes values already scaled up
    to 16 bits), so it comes from the observed range, as DICOM's BitsStored would: 12-bit
    data (0..4095, typical of DICOM exports) gives 12, full-range data 16.
    """
    high = int(values.max()) if values.size else 0
    return max(8, high.bit_length())


def _sixteen_to_eight(values: np.ndarray, mode: str) -> np.ndarray:
    """Scales 16-bit values by their significant bits to 8 bits, through a lookup table.

    Full-range data is the exact inverse of the usual x * 257 widening. The table keeps the
    memory to the output (no wide intermediate arrays of a large image).
    """
    if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageError("32-bit integer image with values outside 0..65535 is not supported")
    full = (1 << significant_bits(values)) - 1
    table = ((np.arange(full + 1, dtype=np.uint64) * 255 + full // 2) // full).astype(np.uint8)
    return table[values]


def _dicom_values(data: bytes) -> tuple[np.ndarray, str]:
    """Reads a DICOM file's pixels after the modality and VOI LUTs; returns them + photometric."""
    import pydicom  # Lazily: only DICOM inputs need it.
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data")
    bits = int(ds.get("BitsAllocated", 16) or 16)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    # Checked before decoding: the float64 working copy below is 8 bytes per pixel.
    _check_decoded_size(
        int(ds.get("Columns", 0) or 0),
        int(ds.get("Rows", 0) or 0),
        f"DICOM {bits}-bit",
        math.ceil(bits / 8) * samples,
    )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    pixels = ds.pixel_array
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64), photometric
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ImageError(f"unsupported DICOM photometric interpretation {photometric}")
    return pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114]), photometric


def _decode_dicom(data: bytes) -> np.ndarray:
    """Decodes a DICOM file: modality LUT, VOI LUT, MONOCHROME1 inverted, min-max to 8 bits."""
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            # pydicom warns per file about parser guesses on odd files; failures still raise.
            warnings.simplefilter("ignore")
            values, photometric = _dicom_values(data)
    except ImageError:
        raise
    except (
        InvalidDicomError,
        AttributeError,
        EOFError,
        KeyError,
        NotImplementedError,
        OSError,
        RuntimeError,
        TypeError,
        ValueError,
    ) as e:
        raise ImageError(f"unreadable DICOM: {e}") from e
    if values.ndim != 2:
        raise ImageError(f"DICOM pixel data has shape {values.shape}, expected 2-D")
    low, high = float(values.min()), float(values.max())
    scaled = np.zeros(values.shape, np.uint8)
    if high > low:
        scaled = np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
    if photometric == "MONOCHROME1":  # Low values are white in MONOCHROME1.
        scaled = 255 - scaled
    return scaled


def _resize_pil(image: Image.Image, size: int) -> Image.Image:
    """Resizes a mode-L image so its longest side is `size` (see `resize_longest_side`)."""
    height, width = target_shape(image.height, image.width, size)
    if (width, height) == image.size:
        return image
    factor = min(image.width // width, image.height // height)
    if factor >= 2:
        # A cheap box reduction first: resampling cost then no longer scales with the input.
        image = image.reduce(factor)
    return image.resize((width, height), Image.Resampling.BILINEAR)


def _encode_pil(image: Image.Image, encoding: str, jpeg_quality: int) -> bytes:
    if encoding == "raw":
        return image.tobytes()
    buffer = io.BytesIO()
    if encoding == "jpeg":
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        image.save(buffer, "JPEG", quality=jpeg_quality)
    elif encoding == "png":
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return buffer.getvalue()
