"""Tests of tools.make_fullsize_copy on a few small JPEGs made here (seconds, no ../shared)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tools import make_fullsize_copy as copy_tool

CSV_TEXT = "id,boneage,male\n1377,180,False\n1378,12,False\n1379,94,True\n"


def _radiograph(seed: int) -> np.ndarray:
    """A 256x256 dark image with a bright blob and some texture (a JPEG like the source's)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:256, :256]
    blob = 150 * np.exp(-(((x - 128) / 50.0) ** 2 + ((y - 140) / 70.0) ** 2))
    return np.clip(20 + blob + rng.normal(0, 4, (256, 256)), 0, 255).astype(np.uint8)


@pytest.fixture
def source(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "src"
    (folder / copy_tool.IMAGES_NAME).mkdir(parents=True)
    (folder / copy_tool.CSV_NAME).write_text(CSV_TEXT)
    for k, image_id in enumerate(("1377", "1378", "1379")):
        path = folder / copy_tool.IMAGES_NAME / f"{image_id}.jpg"
        Image.fromarray(_radiograph(k), "L").save(path, quality=90)
    return folder


def _run(source: pathlib.Path, output: pathlib.Path, *extra: str) -> int:
    return copy_tool.main(
        [
            "make_fullsize_copy",
            f"--source={source}",
            f"--output={output}",
            "--check_images=0",
            *extra,
        ]
    )


def _png_header(path: pathlib.Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    data = path.read_bytes()[16:26]
    return (
        int.from_bytes(data[0:4], "big"),
        int.from_bytes(data[4:8], "big"),
        data[8],
        data[9],
    )


def test_copy_is_full_size_8_bit_grey_with_the_labels_unchanged(source, tmp_path):
    output = tmp_path / "out"
    assert _run(source, output, "--workers=2") == 0
    assert (output / copy_tool.CSV_NAME).read_bytes() == (source / copy_tool.CSV_NAME).read_bytes()
    pngs = sorted((output / copy_tool.IMAGES_NAME).iterdir())
    assert [p.name for p in pngs] == ["1377.png", "1378.png", "1379.png"]
    for path in pngs:
        assert _png_header(path) == (1600, 2080, 8, 0)  # Colour type 0: grey, no palette.
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (1600, 2080)


def test_grain_is_present_seeded_and_deterministic(source):
    small = np.asarray(Image.open(source / copy_tool.IMAGES_NAME / "1377.jpg"))
    plain = copy_tool.full_size(small, "1377", seed=0, grain=0.0)
    first = copy_tool.full_size(small, "1377", seed=0, grain=0.75)
    assert plain.shape == first.shape == (2080, 1600) and first.dtype == np.uint8
    noise = first.astype(np.float64) - plain
    assert (noise != 0).mean() > 0.1  # Not a plain upscale...
    assert 0.1 < noise.std() < 0.75  # ... but grain of at most the asked strength (at white).
    again = copy_tool.full_size(small, "1377", seed=0, grain=0.75)
    assert copy_tool.encode_png(again) == copy_tool.encode_png(first)
    other_id = copy_tool.full_size(small, "1378", seed=0, grain=0.75)
    other_seed = copy_tool.full_size(small, "1377", seed=1, grain=0.75)
    assert not np.array_equal(other_id, first) and not np.array_equal(other_seed, first)


def test_two_runs_write_the_same_bytes(source, tmp_path):
    assert _run(source, tmp_path / "a", "--limit=1") == 0
    assert _run(source, tmp_path / "b", "--limit=1") == 0
    name = f"{copy_tool.IMAGES_NAME}/1377.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / copy_tool.CSV_NAME).read_text() == "id,boneage,male\n1377,180,False\n"


@pytest.mark.slow
def test_a_rerun_skips_finished_images_and_redoes_the_rest(source, tmp_path, capsys):
    output = tmp_path / "out"
    assert _run(source, output, "--limit=2") == 0
    folder = output / copy_tool.IMAGES_NAME
    done = folder / "1377.png"
    before = done.stat()
    (folder / "1378.png").write_bytes(b"\x89PNG truncated")  # An interrupted write...
    (folder / "1379.png.tmp-123").write_bytes(b"partial")  # ... and a stale temp file.
    capsys.readouterr()
    assert _run(source, output) == 0
    assert "3 images, 1 already done, 2 to write" in capsys.readouterr().out
    after = done.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in folder.iterdir()) == ["1377.png", "1378.png", "1379.png"]
    assert copy_tool.is_complete(folder / "1378.png")
    assert (output / copy_tool.CSV_NAME).read_text() == CSV_TEXT


def test_an_output_inside_the_repository_or_the_source_is_refused(source, capsys):
    for output in (REPO_ROOT / "fullsize-copy-test", source / "copy"):
        assert _run(source, output) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("make_fullsize_copy: error: --output"), err
        assert "lies inside" in err[0]
        assert not output.exists()


def test_bad_inputs_are_one_line_errors_or_an_itemised_skip(source, tmp_path, capsys):
    assert _run(tmp_path / "nowhere", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no boneage-training-dataset.csv" in err[0], err
    (source / copy_tool.IMAGES_NAME / "1378.jpg").write_bytes(b"not an image")
    (source / copy_tool.IMAGES_NAME / "1379.jpg").unlink()
    assert _run(source, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "skipped 2 image(s):" in out
    assert "1378: corrupt or truncated image" in out or "1378: not a PNG" in out
    assert "1379: image file not found" in out
    assert (
        tmp_path / "out" / copy_tool.CSV_NAME
    ).read_text() == "id,boneage,male\n1377,180,False\n"


def test_help_exits_0(capsys):
    assert copy_tool.main(["make_fullsize_copy", "--help"]) == 0
    out = capsys.readouterr().out
    assert "~9 GB" in out and "--output" in out and "--workers" in out


def test_the_check_prints_both_distributions(source, tmp_path, capsys):
    # The copy checked against itself: the report's shape, not the real samples' figures.
    output = tmp_path / "out"
    assert _run(source, output, "--limit=2") == 0
    reference = output / copy_tool.IMAGES_NAME
    config = copy_tool.CopyConfig(
        source=str(source), output=str(output), reference=str(reference), check_images=2
    )
    result = copy_tool.check(config)
    out = capsys.readouterr().out
    assert result["real"]["images"] == result["copy"]["images"] == 2
    assert result["kb_median_within_20pct"] and result["decode_ms_median_within_20pct"] is not None
    assert "median size: copy +0.0% vs real, within +-20 %" in out
    assert "load average (1 min)" in out
