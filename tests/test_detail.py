"""The detail size: larger pictures brought down to the training images' size, measured
from the folder, saved with the model and applied the same way by every engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft import TrainConfig, UsageError
from graft.detail import measure_detail, resolve_detail
from graft.runtime import cap_detail


def _sprite(path: Path, canvas: int, side: int) -> None:
    """A ``side`` px object on a white ``canvas``: trimmed to about ``side`` * 1.16."""
    im = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    start = (canvas - side) // 2
    im.paste((180, 40, 40), (start, start, start + side, start + side))
    im.save(path)


def test_cap_detail_brings_only_larger_pictures_down() -> None:
    wide = Image.new("RGB", (200, 100), (10, 20, 30))
    assert cap_detail(wide, 50).size == (50, 25)  # the longest side, aspect kept
    assert cap_detail(wide, 200) is wide and cap_detail(wide, 0) is wide
    assert cap_detail(Image.new("RGB", (1, 400)), 40).size == (1, 40)  # never 0 px wide


def test_the_median_size_after_the_trim_and_none_for_large_pictures(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    for i, side in enumerate([20, 30, 40, 50, 60]):
        _sprite(small / f"{i}.png", 100, side)
    paths = sorted(small.iterdir())
    # trimmed: the object plus an 8% margin on each side; the canvas without the trim
    assert measure_detail(paths, 128, trim=True) == round(40 * 1.16)
    assert measure_detail(paths[::-1], 128, trim=True) == round(40 * 1.16)  # any order
    assert measure_detail(paths, 128, trim=False) == 100
    assert measure_detail(paths, 64, trim=False) == 0  # not under the input size
    large = tmp_path / "large"
    large.mkdir()
    for i in range(3):  # judged by the header alone: at least four times the input size
        Image.new("RGB", (900, 600), (i, i, i)).save(large / f"{i}.jpg")
    assert measure_detail(sorted(large.iterdir()), 128, trim=True) == 0
    canvas = tmp_path / "canvas"  # small sprites on large canvases: measured after the trim
    canvas.mkdir()
    for i in range(3):
        _sprite(canvas / f"{i}.png", 400, 40)
    assert measure_detail(sorted(canvas.iterdir()), 128, trim=True) == round(40 * 1.16)
    (small / "broken.png").write_bytes(b"not an image")
    assert measure_detail(sorted(small.iterdir()), 128, trim=True) == round(40 * 1.16)
    assert measure_detail([], 128, trim=True) == 0


def test_the_option_auto_off_or_pixels(tmp_path: Path) -> None:
    _sprite(tmp_path / "a.png", 40, 40)
    paths = [tmp_path / "a.png"]
    assert resolve_detail("auto", paths, 128, trim=False) == 40
    assert resolve_detail("off", paths, 128, trim=False) == 0
    assert resolve_detail("64", paths, 128, trim=False) == 64
    assert resolve_detail("200", paths, 128, trim=False) == 0  # would change nothing
    assert TrainConfig(detail_size=64).detail_size == "64"  # a number from the library
    assert TrainConfig(detail_size=np.int64(64)).detail_size == "64"
    # "²" and "٣٢" are digits to str.isdigit() but not numbers to int()
    for bad in ("big", "4", "-3", "2000", 64.0, "²", "٣٢"):
        with pytest.raises(UsageError, match=r"detail-size .* use auto, off or a whole number"):
            TrainConfig(detail_size=bad)
    with pytest.raises(UsageError, match="detail-size True is not valid: use text"):
        TrainConfig(detail_size=True)
    with pytest.raises(UsageError, match="under --img-size 64"):  # nothing to bring down
        TrainConfig(detail_size="100", img_size=64)


def test_the_run_says_what_auto_came_to(trained_run: Path) -> None:
    import json

    from graft.model import load_model

    measured = load_model(trained_run).info.detail_size
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["detail_size"] == measured > 0
    assert json.loads((trained_run / "config.json").read_text())["detail_size"] == "auto"
    assert f"auto: {measured} px" in (trained_run / "report.html").read_text()
