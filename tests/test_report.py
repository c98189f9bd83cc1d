"""The HTML report: self-contained, complete, and rendered by a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft.cli import main


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


def test_report_is_self_contained_and_complete(trained_run: Path, unseen_dir: Path, capsys) -> None:
    assert main(["evaluate", str(trained_run), str(unseen_dir), "--json"]) == 0
    assert main(["report", str(trained_run)]) == 0
    text = (trained_run / "report.html").read_text()
    page = _Collect()
    page.feed(text)
    assert page.links == []  # nothing to fetch: it works offline and mailed
    assert len(page.images) >= 5 and all(
        s.startswith("data:image/png;base64,") for s in page.images
    )
    assert page.headings[:4] == ["Data", "Training", "Held-out test split", "Images from elsewhere"]
    assert "held-out accuracy" in text and "95% interval" in text
    assert "Duplicate audit" in text and 'name="viewport"' in text.replace("'", '"')
    assert re.search(r"folder shapes</b>: accuracy \d+\.\d%", text)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)
def test_report_renders_in_headless_chromium(trained_run: Path, tmp_path: Path) -> None:
    """A phone-sized screenshot: the page renders, and it is not blank."""
    assert _chromium() is not None, "CI must install Debian's chromium"
    main(["report", str(trained_run)])
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            "--window-size=412,2400",
            f"--screenshot={shot}",
            (trained_run / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert image.shape == (2400, 412)
    assert image.std() > 20  # text, plots and tables, not an empty page
