"""The installed package alone runs the whole job: phantom -> converter -> train -> evaluate ->
predict, from a wheel install (`pip install .`, not editable) run in an empty folder.

Fast and offline: the fresh venv gets no dependencies from the network; a .pth file lets it see
the test interpreter's site-packages (TensorFlow & co.), and pip installs only boneage-tpu from
a copy of the sources (`--no-deps --no-build-isolation --no-index`). That .pth is not processed
as a site directory, so the outer venv's editable install of the repository stays invisible;
the test checks the package is imported from the new venv.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.conftest import REPO_ROOT

SOURCES = ("boneage_tpu", "setup.cfg", "pyproject.toml", "README.md")


def _run(command: list[str], cwd: pathlib.Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


@pytest.mark.slow
def test_wheel_install_runs_phantom_convert_train_evaluate_predict(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (pathlib.Path(site) / "outer_site_packages.pth").write_text("\n".join(sorted(outer)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    pip += ["--no-deps", "--no-build-isolation", "--no-index", str(source)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2")
    _run(pip, tmp_path, env)

    work = tmp_path / "work"  # Empty, outside the repository: nothing can come from the checkout.
    work.mkdir()
    where = _run([str(python), "-c", "import boneage_tpu; print(boneage_tpu.__file__)"], work, env)
    assert where.strip().startswith(site), where
    bin_dir = venv / "bin"
    _run(
        [bin_dir / "boneage-make-phantom", "--output=phantom", "--num_images=40", "--width=64"]
        + ["--height=80", "--num_workers=1"],
        work,
        env,
    )
    images = work / "phantom" / "boneage-training-dataset"
    _run(
        [python, "-m", "boneage_tpu.convert", "--labels=phantom/boneage-training-dataset.csv"]
        + [f"--images={images}", "--output=data", "--image_size=32", "--encoding=png"]
        + ["--val_fraction=0.25", "--num_workers=0", "--quiet"],
        work,
        env,
    )
    out = _run(
        [bin_dir / "boneage-train", "--data=data", "--model_dir=model", "--backbone=tiny"]
        + ["--image_size=32", "--batch_size=4", "--train_steps=2", "--steps_per_loop=1"]
        + ["--checkpoint_every=2", "--dense_units=8", "--noaugment"],
        work,
        env,
    )
    assert "done: step 2" in out
    assert (work / "model" / "DONE").exists() and (work / "model" / "export").is_dir()
    out = _run([bin_dir / "boneage-evaluate", "--model_dir=model", "--data=data"], work, env)
    assert "mae_months" in out and (work / "model" / "eval" / "val-2" / "report.html").exists()
    png = sorted(images.glob("*.png"))[0]
    out = _run([bin_dir / "boneage-predict", "--model=model", "--sex=F", str(png)], work, env)
    assert png.stem in out
    bad = subprocess.run(
        [bin_dir / "boneage-train", "--data=data", "--model_dir=m2", "--batch_size=0"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "train: error: --batch_size must be >= 1, got 0" in bad.stderr
