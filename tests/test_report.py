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


def test_learning_curves_break_between_stages(tmp_path: Path) -> None:
    """A probe's last L2 point and the first fine-tuning epoch are not joined by a line."""
    import math

    from graft.plots import by_stage, plot_learning_curves, x_label
    from graft.rundir import EpochRecord

    rows = [
        EpochRecord("frozen", i, i, 0.5 / i, 0.9, 0.6 / i, 0.9, 0.0, 1.0, l2=10.0**-i)
        for i in (1, 2, 3)
    ] + [EpochRecord("fine-tune", i, 3 + i, 0.3, 0.95, 0.4, 0.95, 1e-5, 1.0) for i in (1, 2)]
    xs, ys = by_stage(rows, "val_loss")
    assert xs == [1, 2, 3, 3.5, 4, 5]
    assert math.isnan(ys[3]) and ys[:3] == pytest.approx([0.6, 0.3, 0.2]) and ys[4:] == [0.4, 0.4]
    assert x_label(rows) == "step: L2 path points, then epochs"
    assert x_label(rows[:3]) == "step: L2 path points" and x_label(rows[3:]) == "epoch"
    plot_learning_curves(rows, tmp_path / "curves.png", best_step=3)
    assert Image.open(tmp_path / "curves.png").size[0] > 800


def test_names_in_scripts_the_font_lacks_draw_without_raw_warnings(tmp_path: Path) -> None:
    # Found by the twelfth session's hostile pass: a class or file named in CJK printed
    # matplotlib's "Glyph ... missing from font" warnings on the user's terminal.
    import warnings

    import numpy as np

    from graft.audit import plot_pairs
    from graft.plots import plot_class_counts, plot_confusion_matrix

    names = ["名前", "ピカチュウ", "cat"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        plot_class_counts(dict(zip(names, [3, 4, 5], strict=True)), tmp_path / "counts.png")
        plot_confusion_matrix(np.eye(3, dtype=int), names, tmp_path / "confusion.png")
        image = tmp_path / "図.png"
        from PIL import Image

        Image.new("RGB", (16, 16), "red").save(image)
        plot_pairs([(0, 0, 1.0)], [image], None, tmp_path / "pairs.png")
    assert all(
        (tmp_path / f).stat().st_size > 0 for f in ("counts.png", "confusion.png", "pairs.png")
    )
    # and the filter was local: the process's own warnings are untouched
    assert not any("Glyph" in str(f[2]) for f in warnings.filters if f[1] is not None)


def test_names_cut_to_fit_a_figure_say_they_were_cut() -> None:
    from graft.plots import clipped

    assert clipped("pikachu/back-shiny-female-015.png", 30, keep_end=True) == (
        "…chu/back-shiny-female-015.png"
    )
    assert clipped("a-very-long-file-name-of-a-photo.jpg", 24) == "a-very-long-file-name-o…"
    assert clipped("short.png", 24) == "short.png"
