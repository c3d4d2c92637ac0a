"""Opens an evaluation's report.html in a real browser (headless Chromium).

Debian's `chromium` package provides the browser; `.ci/run` installs it when missing. The test
skips, saying why, only where no Chromium is on PATH. Two runs of the browser: `--dump-dom` of a
copy of the page with a script that writes every <img>'s naturalWidth into the DOM after the
load event (0 = broken image), and `--screenshot` of the page itself.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from boneage_tpu.core import schema
from boneage_tpu.evaluate import job as evaluate
from boneage_tpu.evaluate import report
from tests.model_dirs import BATCH, make_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# As root (CI containers) Chromium needs --no-sandbox; the rest keeps it offline and quiet.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
PROBE = """<script>
window.addEventListener("load", () => {
  const widths = Array.from(document.images, (img) => img.naturalWidth);
  document.body.setAttribute("data-image-widths", widths.join(","));
});
</script>"""


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "no Chromium on PATH (tried " + ", ".join(BROWSERS) + "): `.ci/run` installs Debian's "
        "chromium package with apt-get when it runs as root; install it to run this test"
    )


def _run_browser(browser: str, profile: pathlib.Path, *args: str) -> str:
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def report_dir(toy_data, tmp_path_factory) -> pathlib.Path:
    """An evaluation with a gallery, on the session's toy records (10 val) and a tiny model."""
    root = tmp_path_factory.mktemp("browser")
    run = make_run(root / "run", schema.read_manifest(toy_data))
    out = root / "eval"
    evaluate.run(model_dir=run, data=toy_data, batch_size=BATCH, output=str(out))
    return out


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    browser = _browser()
    page = (report_dir / report.REPORT_HTML_NAME).read_text()
    expected_images = page.count("<img")
    assert expected_images == 1 + 2 * 5  # the figure + 5 worst + 5 best of the 10 val images

    probe = report_dir / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "\n</body>"))
    dom = _run_browser(browser, tmp_path / "profile-dom", "--dump-dom", probe.as_uri())
    found = re.search(r'data-image-widths="([0-9,]*)"', dom)
    assert found, "the load event never fired (no data-image-widths in the DOM dump)"
    widths = [int(w) for w in found.group(1).split(",") if w]
    assert len(widths) == expected_images
    assert all(w > 0 for w in widths), f"broken <img> (naturalWidth 0): {widths}"
    assert widths[0] == report.REPORT_PNG_SIZE[0]

    shot = tmp_path / "report.png"
    page_uri = (report_dir / report.REPORT_HTML_NAME).as_uri()
    _run_browser(browser, tmp_path / "profile-shot", "--window-size=1280,1600",
                 f"--screenshot={shot}", page_uri)  # fmt: skip
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        rgb = np.asarray(image.convert("RGB"), np.int32)
    # Not blank: text, plots and heatmaps give many colours and a spread of brightness.
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200
    assert rgb.std() > 20
    # The gallery's jet-coloured heatmaps are on screen: strongly red or blue pixels.
    colourful = (np.abs(rgb[..., 0] - rgb[..., 2]) > 100).sum()
    assert colourful > 500, colourful
    os.remove(probe)
