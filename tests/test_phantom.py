"""Tests of the bone-age phantom: scene model, renderer, data-set writer and CLI."""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from boneage_tpu.cli import make_phantom as make_phantom_cmd
from boneage_tpu.phantom import dataset as phantom_dataset
from boneage_tpu.phantom import render as phantom_render
from boneage_tpu.phantom import sheet as phantom_sheet
from boneage_tpu.phantom.anatomy import CARPAL_ONSET, build_scene
from boneage_tpu.phantom.job import PhantomError, generate, plan_records
from boneage_tpu.phantom.render import render_phantom

REPO = pathlib.Path(__file__).resolve().parents[1]
AGES = np.arange(0.0, 229.0, 1.0)
SMALL = {"width": 96, "height": 120, "size_jitter": 0.0}


def _scenes(seed: int, male: bool, ages=AGES):
    return [build_scene(a, male, np.random.default_rng(seed)) for a in ages]


def _first_age(scenes, predicate) -> float:
    """Returns the first age at which `predicate(scene)` holds (inf if never)."""
    return next((s.age_months for s in scenes if predicate(s)), float("inf"))


def _events(scene_names):
    carpals = {f"carpal:{n}": (lambda s, n=n: _carpal(s, n).ossified) for n in CARPAL_ONSET}
    epiphyses = {
        f"epiphysis:{b}": (lambda s, b=b: s.bone(b).epiphysis.ossified) for b in scene_names
    }
    fusions = {f"fusion:{b}": (lambda s, b=b: s.bone(b).epiphysis.fused) for b in scene_names}
    return {**carpals, **epiphyses, **fusions, "sesamoid": lambda s: s.sesamoid.ossified}


def _carpal(scene, name):
    return next(c for c in scene.carpals if c.name == name)


def test_scene_lists_all_hand_bones():
    scene = build_scene(120.0, True, np.random.default_rng(0))
    names = {b.name for b in scene.bones}
    assert len(scene.bones) == 21
    assert {"radius", "ulna", "mc1", "pp5", "mp2", "dp1"} <= names
    assert not any(n.startswith("mp1") for n in names)  # the thumb has no middle phalanx
    assert sorted(c.name for c in scene.carpals) == sorted(CARPAL_ONSET)


@pytest.mark.parametrize("male", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maturity_counts_never_decrease_with_age(seed, male):
    scenes = _scenes(seed, male)
    for attr in ("num_ossified_carpals", "num_ossified_epiphyses", "num_fused_plates"):
        counts = np.array([getattr(s, attr) for s in scenes])
        assert np.all(np.diff(counts) >= 0), attr
    assert scenes[0].num_ossified_epiphyses == 0
    assert scenes[0].num_fused_plates == 0
    assert scenes[0].num_ossified_carpals <= 2  # capitate and hamate at most
    assert scenes[-1].num_ossified_carpals == 8
    assert scenes[-1].num_fused_plates == 21
    assert scenes[-1].sesamoid.ossified


@pytest.mark.parametrize("seed", [0, 3])
def test_girls_reach_each_stage_earlier(seed):
    ages = np.arange(0.0, 229.0, 0.5)
    boys, girls = _scenes(seed, True, ages), _scenes(seed, False, ages)
    events = _events([b.name for b in boys[0].bones])
    for name, happened in events.items():
        boy, girl = _first_age(boys, happened), _first_age(girls, happened)
        assert girl <= boy, name
        if boy >= 12.0:
            assert girl < boy, name
    # The documented windows: plates fuse ~13-15 y in girls and ~15-17 y in boys.
    fused = [
        _first_age(s, lambda x, b=b: x.bone(b).epiphysis.fused)
        for s in (boys, girls)
        for b in ("dp3", "radius")
    ]
    assert 170 <= fused[0] < fused[1] <= 215  # boys: distal phalanx first, radius last
    assert 148 <= fused[2] < fused[3] <= 186  # girls


def test_carpals_appear_in_greulich_pyle_order():
    scenes = _scenes(0, True, np.arange(0.0, 229.0, 0.5))
    onset = {n: _first_age(scenes, lambda s, n=n: _carpal(s, n).ossified) for n in CARPAL_ONSET}
    assert max(onset["capitate"], onset["hamate"]) < 12
    assert onset["hamate"] < onset["triquetrum"] < onset["lunate"] < onset["trapezium"]
    assert onset["trapezoid"] < onset["scaphoid"] < onset["pisiform"]
    assert 24 <= onset["triquetrum"] <= 36 and 108 <= onset["pisiform"] <= 144


@pytest.mark.parametrize("seed", range(6))
def test_distal_phalanges_fuse_first_and_radius_last(seed):
    scenes = _scenes(seed, seed % 2 == 0, np.arange(120.0, 229.0, 0.25))
    names = [b.name for b in scenes[0].bones]
    fused = {n: _first_age(scenes, lambda s, n=n: s.bone(n).epiphysis.fused) for n in names}
    distal = [fused[n] for n in names if n.startswith("dp")]
    others = [fused[n] for n in names if not n.startswith("dp") and n != "radius"]
    assert max(distal) < min(others) and max(others) < fused["radius"]


def test_continuous_traits_grow_with_age():
    young, mid, old = _scenes(4, True, [30.0, 110.0, 190.0])
    for a, b in ((young, mid), (mid, old)):
        assert b.bone("mc3").width > a.bone("mc3").width
        assert b.bone("mc3").cortex > a.bone("mc3").cortex
        assert b.density > a.density
        assert _carpal(b, "capitate").semi_axes[0] > _carpal(a, "capitate").semi_axes[0]
    assert mid.bone("pp3").epiphysis.width > young.bone("pp3").epiphysis.width
    # Finger bones take more of the finger's soft-tissue width as the child grows.
    ratio = [s.bone("pp3").width / s.soft_tissue.fingers[2][2] for s in (young, mid, old)]
    assert ratio[0] < ratio[1] < ratio[2]
    plate = [s.bone("pp3").epiphysis.plate for s in _scenes(4, True, [120.0, 170.0, 190.0])]
    assert plate[0] > plate[1] > plate[2] == 0.0


def test_scene_rejects_negative_age():
    with pytest.raises(ValueError, match="bone_age_months"):
        build_scene(-1.0, True, np.random.default_rng(0))


def test_render_is_deterministic_8bit():
    a = render_phantom(100.0, True, seed=5, width=96, height=120)
    b = render_phantom(100.0, True, seed=5, width=96, height=120)
    c = render_phantom(100.0, True, seed=6, width=96, height=120)
    assert a.dtype == np.uint8 and a.shape == (120, 96)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1.0


def test_hand_fills_60_to_90_percent_of_height_at_every_age():
    for i, age in enumerate((2.0, 60.0, 150.0, 220.0)):
        scene = build_scene(age, i % 2 == 0, np.random.default_rng(i))
        for k in range(20):
            nz = phantom_render.sample_nuisance(np.random.default_rng(k))
            frame = phantom_render._Frame(scene, nz, 640, 800)
            length = np.hypot(
                *(frame.points(np.array(scene.soft_tissue.tip)) - frame.points(np.zeros(2)))
            )
            assert 0.6 * 800 <= length <= 0.9 * 800 + 1e-6
            assert abs(np.degrees(nz.rotation)) <= 15.0


def test_mean_intensity_and_size_do_not_track_age():
    records = plan_records("/unused", 160, seed=11, width=96, height=120, size_jitter=0.2)
    ages = np.array([r.true_age_months for r in records])
    means = [
        render_phantom(r.true_age_months, r.male, r.render_seed, r.width, r.height).mean()
        for r in records
    ]
    sizes = np.array([r.width * r.height for r in records])
    assert abs(np.corrcoef(ages, means)[0, 1]) < 0.2
    assert abs(np.corrcoef(ages, sizes)[0, 1]) < 0.2
    assert sizes.std() > 0  # sizes do vary


def test_age_sex_follow_the_embedded_rsna_histogram():
    counts = phantom_dataset._RSNA_COUNTS
    assert (sum(counts[False]), sum(counts[True])) == (5778, 6833)
    records = plan_records("/unused", 4000, seed=1)
    ages = np.array([r.true_age_months for r in records])
    assert abs(ages.mean() - 127.3) < 3.0
    assert abs(np.mean([r.male for r in records]) - 6833 / 12611) < 0.03
    assert ages.min() >= 0.0 and ages.max() <= 228.0


@pytest.mark.shared
def test_embedded_histogram_matches_official_labels(rsna_labels_csv):
    with open(rsna_labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    edges = np.arange(0, 229, phantom_dataset.AGE_BIN_MONTHS)
    for male in (False, True):
        ages = [int(r["boneage"]) for r in rows if (r["male"] == "True") == male]
        hist, _ = np.histogram(ages, bins=edges)
        assert tuple(hist) == phantom_dataset._RSNA_COUNTS[male]


def test_labels_add_rounded_clipped_rater_noise():
    exact = plan_records("/unused", 500, seed=2, label_noise_months=0.0)
    for r in exact:
        assert r.label_months == min(max(round(r.true_age_months), 1), 228)
    noisy = plan_records("/unused", 3000, seed=2, label_noise_months=5.0)
    err = np.array(
        [r.label_months - r.true_age_months for r in noisy if 20 < r.true_age_months < 200]
    )
    assert 4.5 < err.std() < 5.5 and abs(err.mean()) < 0.5
    assert all(isinstance(r.label_months, int) and 1 <= r.label_months <= 228 for r in noisy)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_generate_kaggle_layout(tmp_path):
    records = generate(str(tmp_path / "out"), 10, seed=3, num_workers=1, **SMALL)
    rows = _read_csv(tmp_path / "out" / "boneage-training-dataset.csv")
    assert rows[0] == ["id", "boneage", "male"]
    assert len(rows) == 11 and len({r[0] for r in rows[1:]}) == 10
    for row, rec in zip(rows[1:], records, strict=True):
        assert row == [rec.image_id, str(rec.label_months), str(rec.male)]
        assert row[2] in ("True", "False")
        with Image.open(tmp_path / "out" / "boneage-training-dataset" / f"{row[0]}.png") as im:
            assert im.mode == "L" and im.size == (96, 120)


def test_generate_other_layouts(tmp_path):
    val = generate(
        str(tmp_path / "val"), 4, seed=1, layout="rsna_validation", num_workers=1, **SMALL
    )
    rows = _read_csv(tmp_path / "val" / "Validation Dataset.csv")
    assert rows[0] == ["Image ID", "male", "Bone Age (months)"]
    assert [r[1] for r in rows[1:]] == [str(r.male).upper() for r in val]
    assert (tmp_path / "val" / "boneage-validation-dataset" / f"{val[0].image_id}.png").exists()
    test = generate(str(tmp_path / "test"), 4, seed=1, layout="rsna_test", num_workers=1, **SMALL)
    rows = _read_csv(tmp_path / "test" / "boneage-test-dataset.csv")
    assert rows[0] == ["Case ID", "Sex"] and {r[1] for r in rows[1:]} <= {"M", "F"}
    truth = _read_csv(tmp_path / "test" / "Bone age ground truth.csv")
    assert truth[0] == ["Case ID", "Sex", "Ground truth bone age (months)"]
    assert [int(r[2]) for r in truth[1:]] == [r.label_months for r in test]
    assert (tmp_path / "test" / "boneage-test-dataset" / f"{test[0].image_id}.png").exists()


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_regardless_of_workers(tmp_path):
    generate(str(tmp_path / "a"), 8, seed=7, num_workers=1, **SMALL)
    generate(str(tmp_path / "b"), 8, seed=7, num_workers=2, **SMALL)
    generate(str(tmp_path / "c"), 8, seed=8, num_workers=1, **SMALL)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_stale_images_need_overwrite(tmp_path):
    out = str(tmp_path / "out")
    generate(out, 6, seed=0, num_workers=1, **SMALL)
    generate(out, 6, seed=0, num_workers=1, **SMALL)  # re-running the same command is fine
    with pytest.raises(PhantomError, match="--overwrite"):
        generate(out, 3, seed=0, num_workers=1, **SMALL)
    generate(out, 3, seed=0, num_workers=1, overwrite=True, **SMALL)
    assert len(os.listdir(tmp_path / "out" / "boneage-training-dataset")) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_images": 0}, "num_images"),
        ({"width": 10}, "width"),
        ({"layout": "dicom"}, "layout"),
        ({"label_noise_months": -1.0}, "label_noise"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"num_images": 2, **kwargs}
    with pytest.raises(PhantomError, match=message):
        generate(str(tmp_path), args.pop("num_images"), num_workers=1, **args)


def test_cli_writes_data_and_contact_sheet(tmp_path, capsys):
    out, sheet = tmp_path / "p", tmp_path / "sheet.png"
    argv = ["make_phantom", f"--output={out}", "--num_images=6", "--width=96", "--height=120"]
    argv += ["--num_workers=1", f"--contact_sheet={sheet}", "--contact_sheet_size=4"]
    assert make_phantom_cmd.main(argv) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    assert len(_read_csv(out / "boneage-training-dataset.csv")) == 7
    with Image.open(sheet) as im:
        assert im.mode == "L" and im.width == 4 * 192


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--output=OUT", "--num_images=many"], 2, "num_images"),
        (["--output=OUT", "--layout=dicom"], 2, "layout"),
        (["--output=OUT", "--num_images=0"], 2, "num_images must be >= 1"),
        (["--output=OUT", "--num_workers=-1"], 2, "num_workers must be >= 0"),
        ([], 1, "--output is required"),
        (["--age_grid=4"], 1, "--age_grid needs --contact_sheet"),
    ],
)
def test_cli_bad_flags_are_one_line_errors(tmp_path, capsys, args, status, message):
    argv = ["make_phantom", *(a.replace("OUT", str(tmp_path / "out")) for a in args)]
    assert make_phantom_cmd.main(argv) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_phantom: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "boneage-training-dataset.csv").exists()


def test_cli_unwritable_output_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["make_phantom", f"--output={blocker}/sub", "--num_images=2", "--num_workers=1"]
    assert make_phantom_cmd.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_phantom: error: cannot create") and len(err.splitlines()) == 1


def test_module_entry_point_writes_age_grid_sheet(tmp_path):
    sheet = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "tools.make_phantom", "--age_grid=4", f"--contact_sheet={sheet}",
         "--width=96", "--height=120"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(sheet) as im:
        assert im.size == (4 * 192, 240 + 22)
    assert [a for a, _ in phantom_sheet.age_grid(4)] == [0.0, 76.0, 152.0, 228.0]
