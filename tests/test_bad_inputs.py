"""The bad-input corpus: every awkward file a user's disk holds, through scan, train, evaluate
and predict. Each one either works correctly or is named with a reason; nothing crashes."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, cli_args, draw_shape, make_dataset
from graft.cli import main
from graft.data import scan

#: name -> does graft read it as an image (True) or list it as skipped (False)
EXPECTED = {
    "zero-byte.jpg": False,
    "truncated.jpg": False,
    "truncated.png": False,
    "png-named.jpg": True,
    "text-named.jpg": False,
    "cmyk.jpg": True,
    "sixteen-bit.png": True,
    "grayscale.png": True,
    "palette-transparent.png": True,
    "rgba.png": True,
    "exif-rotated.jpg": True,
    "animated.gif": True,
    "one-pixel.png": True,
    "bomb.png": False,
    "L" + "o" * 200 + "ng-name.png": True,
    "loop-a.png": False,  # a symlink loop: a -> b -> a
    "loop-b.png": False,
}
NON_UTF8 = b"caf\xe9-latin1.png"


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    good = draw_shape("circle", rng)
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    good.save(buf, "PNG")
    png = buf.getvalue()
    (folder / "zero-byte.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "png-named.jpg").write_bytes(png)
    (folder / "text-named.jpg").write_text("this is not a picture\n")
    good.convert("CMYK").save(folder / "cmyk.jpg")
    arr16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr16).save(folder / "sixteen-bit.png")
    good.convert("L").save(folder / "grayscale.png")
    pal = good.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "palette-transparent.png", transparency=0)
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    good.resize((64, 32)).save(folder / "exif-rotated.jpg", exif=exif)
    frames = [good, draw_shape("circle", rng)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one-pixel.png")
    Image.new("1", (12000, 8000)).save(folder / "bomb.png")  # 96 Mpx, over Pillow's limit
    good.save(folder / ("L" + "o" * 200 + "ng-name.png"))
    os.symlink(folder / "loop-b.png", folder / "loop-a.png")
    os.symlink(folder / "loop-a.png", folder / "loop-b.png")
    good.save(os.path.join(os.fsencode(folder), NON_UTF8))
    os.symlink(folder, folder / "dir-loop")  # a folder that contains itself


@pytest.fixture(scope="module")
def corpus_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "data"
    make_dataset(root, per_class={"circle": 10, "square": 12, "triangle": 12})
    write_corpus(root / "circle" / "odd")
    return root


def test_scan_reads_the_good_and_names_the_bad(corpus_dataset: Path) -> None:
    data = scan(corpus_dataset)
    read = {p.name for p in data.paths}
    skipped = {p.name: reason for p, reason in data.skipped}
    for name, ok in EXPECTED.items():
        assert (name in read) == ok, (name, skipped.get(name))
        assert (name in skipped) == (not ok)
    assert os.fsdecode(NON_UTF8) in read
    assert "too large" in skipped["bomb.png"]
    assert "not an image" in skipped["text-named.jpg"]
    assert "truncated" in skipped["truncated.png"] or "corrupt" in skipped["truncated.png"]
    assert "symbolic links" in skipped["loop-a.png"]
    assert data.counts["circle"] == 10 + sum(EXPECTED.values()) + 1  # no file counted twice


def test_awkward_images_decode_correctly(corpus_dataset: Path) -> None:
    from graft.data import load_image

    odd = corpus_dataset / "circle" / "odd"
    for name in (
        "cmyk.jpg",
        "sixteen-bit.png",
        "grayscale.png",
        "palette-transparent.png",
        "rgba.png",
        "one-pixel.png",
        "animated.gif",
    ):
        im = load_image(odd / name)
        assert im.mode == "RGB", name
    assert load_image(odd / "exif-rotated.jpg").size == (32, 64)
    assert np.asarray(load_image(odd / "sixteen-bit.png")).max() > 200  # scaled, not clipped


def test_a_float_image_of_0_to_1_is_scaled_not_black(tmp_path: Path) -> None:
    from graft.runtime import load_image

    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (16, 1))
    ramp[0, 0] = np.nan  # a hole in the data is black, not a failure
    Image.fromarray(ramp, "F").save(tmp_path / "float.tiff")
    pixels = np.asarray(load_image(tmp_path / "float.tiff"))
    assert pixels.shape == (16, 64, 3) and pixels.max() == 255 and pixels[1, 0, 0] == 0
    assert 120 <= pixels[1, 32, 0] <= 135  # the middle of the ramp is mid-grey


def test_a_refused_write_names_the_file_not_its_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import graft.io

    def refuse(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(graft.io.os, "replace", refuse)
    target = tmp_path / "evaluation.json"
    with pytest.raises(OSError) as caught:
        graft.io.atomic_write_json(target, {"a": 1})
    assert caught.value.filename == str(target) and caught.value.errno == errno.EPERM
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_train_skips_and_lists_bad_files(
    corpus_dataset: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graft import TrainConfig, fit
    from graft.progress import Reporter

    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(corpus_dataset),
            "--out",
            str(out),
            "--quiet",
            *cli_args({**FAST, "epochs": 1, "fine_tune_epochs": 1}),
        ]
    )
    assert code == 0, capsys.readouterr().err
    with open(out / "skipped.csv", encoding="utf-8", errors="surrogateescape") as fh:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert set(rows) == {n for n, ok in EXPECTED.items() if not ok}
    # said while it trains, not only in the file (a --quiet run stays quiet)
    reporter = Reporter()
    monkeypatch.setattr(reporter, "warn", lambda text: said.append(text))
    said: list[str] = []
    again = tmp_path / "run-again"
    fit(
        TrainConfig(**{**FAST, "epochs": 1, "fine_tune_epochs": 0}),
        corpus_dataset,
        again,
        reporter=reporter,
    )
    left_out = [t for t in said if "could not be used and are left out" in t]
    assert len(left_out) == 1 and str(again / "skipped.csv") in left_out[0]
    # the non-UTF-8 name made it through the split and back
    with open(out / "split.csv", encoding="utf-8", errors="surrogateescape") as fh:
        assert any(r["path"].endswith(os.fsdecode(NON_UTF8)) for r in csv.DictReader(fh))
    # ...and is read back by a resume (of a run made unfinished again)
    (out / "summary.json").unlink()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0


def test_predict_and_evaluate_name_each_bad_file(
    corpus_dataset: Path, trained_run: Path, tmp_path: Path, capsys
) -> None:
    odd = corpus_dataset / "circle" / "odd"
    code = main(["predict", str(trained_run), str(odd), "--json"])
    out, err = capsys.readouterr()
    assert code == 7 and "Traceback" not in err
    preds = {Path(p["path"]).name: p for p in json.loads(out)}
    for name, ok in EXPECTED.items():
        assert ("error" not in preds[name]) == ok, preds[name]
    # a human-readable table with the odd name does not crash the terminal either
    assert main(["predict", str(trained_run), str(odd)]) == 7
    assert "Traceback" not in capsys.readouterr().err
    assert main(["predict", str(trained_run), str(odd), "--csv"]) == 7
    assert "caf\ufffd-latin1.png" in capsys.readouterr().out

    folder = tmp_path / "eval"
    shutil.copytree(corpus_dataset, folder, symlinks=True)
    code = main(["evaluate", str(trained_run), str(folder), "--json"])
    out, err = capsys.readouterr()
    assert code == 7 and "Traceback" not in err
    result = json.loads(out)
    assert {Path(f["path"]).name for f in result["failed"]} == {
        n for n, ok in EXPECTED.items() if not ok
    }


@pytest.mark.parametrize(
    "layout, code, message",
    [
        ({"circle": 5, "square": 0}, 3, "'square'"),  # an empty class folder
        ({"circle": 5, "square": 1}, 3, "'square' (1)"),  # a class with one image
    ],
)
def test_unusable_classes_stop_training_with_their_name(
    tmp_path: Path, layout, code, message, capsys
) -> None:
    root = tmp_path / "data"
    make_dataset(root, per_class={k: v for k, v in layout.items() if v})
    for k in layout:
        (root / k).mkdir(exist_ok=True)
    got = main(["train", str(root), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert got == code and message in err and "Traceback" not in err


def test_folder_of_only_bad_files(tmp_path: Path, capsys) -> None:
    for c in ("a", "b"):
        write_corpus_bad = tmp_path / "data" / c
        write_corpus_bad.mkdir(parents=True)
        (write_corpus_bad / "x.jpg").write_bytes(b"")
        (write_corpus_bad / "y.png").write_text("no")
    assert main(["scan", str(tmp_path / "data")]) == 3
    err = capsys.readouterr().err
    assert "no usable images" in err and "2 unreadable files" in err
