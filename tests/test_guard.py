"""Tests for boneage_tpu.guard: stat-first reads, the output guard, CSV cells, printable names."""

from __future__ import annotations

import csv
import io
import os
import re
import socket

import pytest

from boneage_tpu.core import guard
from boneage_tpu.data import images, layouts

pytestmark = pytest.mark.timeout(60)  # A FIFO that blocked open() would hang here.


@pytest.fixture
def specials(tmp_path):
    """A FIFO, a symlink to /dev/zero, a socket and a folder, each named like an image."""
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.symlink("/dev/null", tmp_path / "null.jpg")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "sock.dcm"))
    (tmp_path / "dir.png").mkdir()
    yield tmp_path
    sock.close()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("pipe.png", "is a FIFO (named pipe), not a regular file"),
        ("zero.png", "is a character device, not a regular file"),
        ("null.jpg", "is a character device, not a regular file"),
        ("sock.dcm", "not a regular file"),
        ("dir.png", "is a folder, not an image file"),
        ("missing.png", "image file not found"),
    ],
)
def test_special_files_are_refused_before_any_read(specials, name, reason):
    with pytest.raises(images.ImageError, match=re.escape(reason)):
        images.read_bytes(str(specials / name))


def test_size_is_bounded_before_reading(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(2 * guard.MB + 1)  # sparse: costs no disk
    with pytest.raises(
        guard.InputFileError, match="2,097,153 bytes, above the 2 MB limit for an image"
    ):
        guard.read_file(str(big), 2 * guard.MB, "an image")
    assert len(guard.read_file(str(big), 3 * guard.MB)) == 2 * guard.MB + 1
    link = tmp_path / "link.png"
    os.symlink(big, link)  # a symlink to a regular file is read like the file
    assert len(guard.read_file(str(link), 3 * guard.MB)) == 2 * guard.MB + 1


def test_labels_csv_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "labels.csv")
    with pytest.raises(layouts.ConvertError, match="FIFO"):
        layouts.read_csv_bytes(str(tmp_path / "labels.csv"))


def test_special_files_in_an_images_folder_are_listed_then_skipped(specials):
    found = layouts.find_images(str(specials))
    # Listed by name like any image; the read refuses them one by one (itemised skips).
    assert {"pipe", "zero", "null", "sock"} <= set(found)


def test_non_utf8_file_name_is_listed_and_printable(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ok.png").write_bytes(b"x")
    found = layouts.find_images(str(tmp_path))
    assert set(found) == {"ok", os.fsdecode(b"caf\xe9")}
    shown = guard.printable(found[os.fsdecode(b"caf\xe9")][0])
    shown.encode("utf-8")  # printable on any terminal: no surrogate left
    assert shown.endswith("caf\\udce9.png")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain-name_1", "plain-name_1"),
        ("évaluation", "évaluation"),  # non-ASCII letters are printable
        ("a\x1b[31mred", "a\\x1b[31mred"),
        ("two\nlines", "two\\nlines"),
        ("tab\there", "tab\\there"),
        ("bell\x07\x9b", "bell\\x07\\x9b"),
    ],
)
def test_printable_escapes_control_characters(name, expected):
    assert guard.printable(name) == expected


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_text_cells_starting_like_a_formula_are_neutralised(prefix):
    cell = f"{prefix}SUM(1+1)"
    assert guard.csv_cell(cell) == "'" + cell
    buf = io.StringIO()
    csv.writer(buf).writerow(guard.csv_row([cell, -3.2, 7, None, "safe"]))
    row = next(csv.reader(io.StringIO(buf.getvalue())))
    assert row == ["'" + cell, "-3.2", "7", "", "safe"]  # numbers stay numbers


def test_check_outputs_refuses_overwriting_an_input(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    (images_dir / "a.png").write_bytes(b"x")
    labels = tmp_path / "labels.csv"
    labels.write_text("id\n")
    inputs = {"--images": [str(images_dir)], "--labels": [str(labels)]}
    refused = [
        {"--output": (str(labels), "file")},
        {"--output": (str(images_dir / "a.png"), "file")},
        {"--output": (f"{images_dir}/./sub/../out.csv", "file")},  # inside, not normalised
        {"--heatmaps": (str(images_dir), "folder")},
        {"--heatmaps": (str(images_dir / "heatmaps"), "folder")},
        {"--heatmaps": (str(tmp_path), "folder")},  # would hold the inputs
    ]
    for outputs in refused:
        with pytest.raises(guard.OutputPathError, match="would overwrite"):
            guard.check_outputs(outputs, inputs)
    link = tmp_path / "alias"
    os.symlink(images_dir, link)
    with pytest.raises(guard.OutputPathError, match="would overwrite --images"):
        guard.check_outputs({"--heatmaps": (str(link / "maps"), "folder")}, inputs)
    guard.check_outputs({"--output": (str(tmp_path / "out.csv"), "file")}, inputs)


def test_check_outputs_refuses_existing_paths_of_the_wrong_kind(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(guard.OutputPathError, match="is a folder: give a file path"):
        guard.check_outputs({"--output": (str(tmp_path / "folder"), "file")}, {})
    with pytest.raises(guard.OutputPathError, match="existing file, not a folder"):
        guard.check_outputs({"--heatmaps": (str(tmp_path / "file"), "folder")}, {})
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(guard.OutputPathError, match="FIFO"):
        guard.check_outputs({"--output": (str(tmp_path / "fifo.csv"), "file")}, {})
