"""Tests for boneage_tpu.data.images: every input kind to 8-bit grayscale, resize, encode/decode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from boneage_tpu.core import schema
from boneage_tpu.data import crop, images


def _gray(height: int = 52, width: int = 40, seed: int = 0) -> np.ndarray:
    """A non-symmetric test image: gradient + noise + a bright marker in the top-left corner."""
    rng = np.random.default_rng(seed)
    image = np.add.outer(np.arange(height) * 2, np.arange(width)).astype(np.float64)
    image = image * (200.0 / image.max()) + rng.integers(0, 30, (height, width))
    image[:5, :4] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", **extra) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_encodings_match_schema():
    assert images.ENCODINGS == schema.ENCODINGS


def test_crop_settings_match_schema():
    assert crop.CROPS == schema.CROPS
    assert (crop.MIN_MARGIN, crop.MAX_MARGIN) == schema.CROP_MARGIN_RANGE


def test_8bit_png_is_lossless():
    gray = _gray()
    out = images.decode_grayscale(_save(Image.fromarray(gray), "PNG"))
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, gray)


def test_16bit_png_scales_the_full_range():
    gray = _gray()
    wide = gray.astype(np.uint16) * 257  # The usual 8 -> 16 bit widening.
    data = _save(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_array_equal(images.decode_grayscale(data), gray)
    full = np.array([[0, 65535, 32896, 128]], np.uint16)
    np.testing.assert_array_equal(
        images.decode_grayscale(_save(Image.fromarray(full), "PNG")), [[0, 255, 128, 0]]
    )


@pytest.mark.parametrize("grayscale_palette", [True, False])
def test_palette_png_matches_pillow_luma(grayscale_palette):
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 200, (30, 20), dtype=np.uint8)
    if grayscale_palette:  # Like RSNA ids 1578/2110: gray palette, index 0 white, transparency.
        levels = np.r_[255, 0, np.arange(2, 256)].astype(np.uint8)
        palette = np.repeat(levels[:, None], 3, axis=1)
    else:
        palette = rng.integers(0, 256, (200, 3), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.flatten().tolist())
    data = _save(image, "PNG", transparency=0)
    expected = np.array(Image.open(io.BytesIO(data)).convert("L"))
    np.testing.assert_array_equal(images.decode_grayscale(data), expected)
    if grayscale_palette:
        np.testing.assert_array_equal(images.decode_grayscale(data), levels[indices])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_color_and_alpha_pngs_become_gray(mode):
    gray = _gray()
    planes = {"RGB": [gray] * 3, "RGBA": [gray] * 3 + [np.full_like(gray, 7)], "LA": [gray, gray]}
    stacked = np.stack(planes[mode], axis=-1)
    out = images.decode_grayscale(_save(Image.fromarray(stacked, mode), "PNG"))
    np.testing.assert_array_equal(out, gray)  # Equal channels: luma is the gray value; no alpha.


def test_jpeg_gray_and_color_decode_close_to_source():
    gray = _gray(80, 64)
    for image in (Image.fromarray(gray), Image.fromarray(np.stack([gray] * 3, -1))):
        out = images.decode_grayscale(_save(image, "JPEG", quality=95))
        assert out.shape == gray.shape
        assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.99


def test_every_format_keeps_the_orientation():
    gray = _gray(60, 44)  # Marker top-left, brightest gradient bottom-right.
    inputs = {
        "png": _save(Image.fromarray(gray), "PNG"),
        "png16": _save(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "rgb": _save(Image.fromarray(np.stack([gray] * 3, -1)), "PNG"),
        "jpeg": _save(Image.fromarray(gray), "JPEG", quality=95),
        "dicom": _dicom(gray.astype(np.uint16) * 16),
    }
    for kind, data in inputs.items():
        out = images.decode_grayscale(data).astype(np.float64)
        assert out.shape == gray.shape, kind
        assert out[:5, :4].mean() > out[5:10, 5:10].mean() + 50, kind
        assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.98, kind


def test_dicom_modality_lut_minmax_and_monochrome1():
    pixels = np.array([[0, 100], [300, 400]], np.uint16)
    data = _dicom(pixels, RescaleSlope=2, RescaleIntercept=-10)
    np.testing.assert_array_equal(images.decode_grayscale(data), [[0, 64], [191, 255]])
    inverted = images.decode_grayscale(_dicom(pixels, "MONOCHROME1"))
    np.testing.assert_array_equal(inverted, [[255, 191], [64, 0]])


def test_dicom_voi_window_is_applied():
    pixels = np.array([[0, 1300], [2000, 4000]], np.uint16)
    windowed = images.decode_grayscale(_dicom(pixels, WindowCenter=1500, WindowWidth=1000))
    # Below the window -> black, above -> white, inside -> proportional.
    assert windowed[0, 0] == 0 and windowed[1, 0] == 255 and windowed[1, 1] == 255
    assert 0 < windowed[0, 1] < 255


def test_dicom_without_preamble_is_found_by_extension():
    ds = pydicom.dcmread(io.BytesIO(_dicom(_gray().astype(np.uint16))))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()[132:]  # Drop preamble + DICM magic.
    assert images.decode_grayscale(data, name="x/123.DCM").shape == (52, 40)
    with pytest.raises(images.ImageError):
        images.decode_grayscale(data, name="123.png")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, not an image" * 10, "unrecognised"),
        (_save(Image.fromarray(_gray(200, 200)), "PNG")[:400], "corrupt or truncated"),
        (_save(Image.fromarray(_gray(200, 200)), "JPEG")[:600], "corrupt or truncated"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00garbage", "DICOM"),
    ],
)
def test_bad_bytes_raise_image_error_with_reason(data, reason):
    with pytest.raises(images.ImageError, match=reason):
        images.decode_grayscale(data, name="x.png")


def test_read_grayscale_and_missing_file(tmp_path):
    gray = _gray()
    Image.fromarray(gray).save(tmp_path / "a.png")
    np.testing.assert_array_equal(images.read_grayscale(str(tmp_path / "a.png")), gray)
    with pytest.raises(images.ImageError, match="not found"):
        images.read_grayscale(str(tmp_path / "missing.png"))


@pytest.mark.parametrize(
    "shape, size, expected",
    [((2080, 1600), 512, (512, 394)), ((1600, 2080), 512, (394, 512)), ((50, 40), 100, (100, 80))],
)
def test_resize_keeps_aspect_and_sets_longest_side(shape, size, expected):
    image = np.zeros(shape, np.uint8)
    out = images.resize_longest_side(image, size)
    assert out.shape == expected == images.target_shape(*shape, size)


def test_resize_same_size_is_identity_and_rejects_bad_input():
    gray = _gray()
    np.testing.assert_array_equal(images.resize_longest_side(gray, 52), gray)
    with pytest.raises(ValueError):
        images.resize_longest_side(gray.astype(np.float32), 20)
    with pytest.raises(ValueError):
        images.resize_longest_side(gray, 0)


def test_downscaling_is_antialiased():
    checker = (np.indices((800, 600)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = images.resize_longest_side(checker, 100).astype(np.float64)
    # Aliasing would leave stripes near 0/255; a low-pass filter gives flat mid-gray.
    assert abs(out.mean() - 127.5) < 2 and out.std() < 2


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_lossless_encodings_round_trip(encoding):
    gray = _gray()
    data = images.encode(gray, encoding)
    np.testing.assert_array_equal(images.decode(data, encoding, *gray.shape), gray)


def test_jpeg_round_trip_and_shape_check():
    gray = _gray(100, 80)
    data = images.encode(gray, "jpeg", jpeg_quality=95)
    out = images.decode(data, "jpeg", 100, 80)
    assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.99
    assert len(images.encode(gray, "jpeg", jpeg_quality=30)) < len(data)
    with pytest.raises(images.ImageError, match="expected"):
        images.decode(data, "jpeg", 80, 100)
    with pytest.raises(images.ImageError, match="expected"):
        images.decode(b"\x00" * 10, "raw", 3, 3)
    with pytest.raises(ValueError):
        images.encode(gray, "webp")
    with pytest.raises(ValueError):
        images.encode(gray, "jpeg", jpeg_quality=0)


@pytest.mark.parametrize("encoding", ["jpeg", "png", "raw"])
def test_prepare_equals_the_public_steps(encoding):
    image = Image.fromarray(_gray(300, 220), "L").convert("P")  # Palette input, downscaled.
    data = _save(image, "PNG")
    encoded, height, width = images.prepare(data, "a.png", 64, encoding, 90)
    steps = images.resize_longest_side(images.decode_grayscale(data), 64)
    assert (height, width) == steps.shape == (64, 47)
    assert encoded == images.encode(steps, encoding, 90)


def test_16bit_png_is_scaled_by_its_significant_bits():
    gray = _gray()
    twelve_bit = (gray.astype(np.uint32) * 4095 // 255).astype(np.uint16)  # 0..4095 (DICOM export)
    data = _save(Image.fromarray(twelve_bit), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = images.decode_grayscale(data)
    assert images.significant_bits(twelve_bit) == 12
    assert out.max() == 255 and np.abs(out.astype(int) - gray).max() <= 1  # Not max 15.
    ten_bit = np.array([[0, 1023, 512, 64]], np.uint16)
    np.testing.assert_array_equal(
        images.decode_grayscale(_save(Image.fromarray(ten_bit), "PNG")), [[0, 255, 128, 16]]
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    gray = _gray(60, 44)  # Marker top-left.
    stored = np.rot90(gray, 1)  # As a camera stores it; EXIF 6 says "rotate 90 CW to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(np.ascontiguousarray(stored)), fmt, exif=exif.tobytes())
    out = images.decode_grayscale(data).astype(np.float64)
    assert out.shape == gray.shape
    assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.98
    assert out[:5, :4].mean() > out[5:10, 5:10].mean() + 50  # The marker is top-left again.


def _png_header_only(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A PNG signature + IHDR + IEND: Pillow opens it (lazily) without pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decoded_size_bounds_memory_by_bit_depth_and_channels(monkeypatch):
    # 13000 x 13000 x 16 bit: under Pillow's pixel limit, but 322 MB decoded.
    with pytest.raises(images.ImageError, match=r"image too large: 13000x13000 I;16 decodes to"):
        images.decode_grayscale(_png_header_only(13000, 13000, 16, 0), "big.png")
    # Same pixel count, 8 and 16 bits, 1 and 3 channels: the budget counts bytes.
    gray = _gray(40, 40)
    monkeypatch.setattr(images, "MAX_DECODED_BYTES", 40 * 40 + 1)
    images.decode_grayscale(_save(Image.fromarray(gray), "PNG"))
    for image in (
        Image.fromarray(gray.astype(np.uint16) * 257),
        Image.fromarray(np.stack([gray] * 3, -1)),
    ):
        with pytest.raises(images.ImageError, match="per-image limit"):
            images.decode_grayscale(_save(image, "PNG"))
    with pytest.raises(images.ImageError, match="DICOM 16-bit decodes to"):
        images.decode_grayscale(_dicom(gray.astype(np.uint16)))


def test_read_errors_of_one_file_are_image_errors(tmp_path):
    with pytest.raises(images.ImageError, match="is a folder, not an image file"):
        images.read_bytes(str(tmp_path))
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(images.ImageError, match=r"cannot read .*a.png/b.png: \[Errno 20\]"):
        images.read_bytes(str(tmp_path / "a.png" / "b.png"))  # ENOTDIR: any OSError.


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: np.full((1, 1), 128, np.uint8), "too small for a radiograph: 1x1"),
        (lambda: np.full((300, 200), 255, np.uint8), "near-constant image"),
        (
            lambda: np.random.default_rng(0).integers(0, 256, (300, 200)).astype(np.uint8),
            "no image structure",
        ),
        (lambda: np.pad(np.full((6, 6), 250, np.uint8), 100), "no hand-like content"),
    ],
)
def test_implausible_images_are_refused_or_warned(make, reason):
    data = _save(Image.fromarray(make()), "PNG")
    with pytest.raises(images.ImplausibleImageError, match=reason):
        images.prepare(data, "x.png", 64, "png")
    warnings = []
    encoded, _, _ = images.prepare(data, "x.png", 64, "png", warn=warnings.append)
    assert encoded and len(warnings) == 1 and reason in warnings[0]
    assert images.plausibility_problem(_gray(300, 220)) == ""
