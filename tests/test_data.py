from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHAPES, draw_shape, make_dataset
from graft.data import build_transform, load_image, scan
from graft.errors import DataError, SplitError
from graft.split import make_split, read_split, write_split


def test_scan_counts_nested_case_insensitive_and_ignores_hidden(shapes_dir: Path) -> None:
    data = scan(shapes_dir)
    assert data.classes == sorted(SHAPES)
    # 14 each, + nested file for circle, + UPPER.PNG for square; hidden file not counted
    assert data.counts == {"circle": 15, "square": 15, "triangle": 14}
    names = {p.name for p in data.paths}
    assert "nested.png" in names and "UPPER.PNG" in names and ".hidden.png" not in names
    nested = next(p for p in data.paths if p.name == "nested.png")
    assert data.classes[data.labels[data.paths.index(nested)]] == "circle"


def test_scan_lists_broken_and_unsupported_files_without_crashing(shapes_dir: Path) -> None:
    data = scan(shapes_dir)
    assert [(p.name, "truncated" in r or "corrupt" in r) for p, r in data.skipped] == [
        ("broken.jpg", True)
    ]
    assert [p.name for p in data.unsupported] == ["notes.txt"]


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Dataset folder not found: .*one sub-folder per class"):
        scan(tmp_path / "nope")


def test_folder_without_class_folders_says_to_make_them(tmp_path: Path) -> None:
    draw_shape("circle", __import__("random").Random(0)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"No class folders .* holds 1 images directly"):
        scan(tmp_path)


def test_empty_class_is_named(tmp_path: Path) -> None:
    make_dataset(tmp_path, per_class={"circle": 4, "square": 4})
    (tmp_path / "triangle").mkdir()
    with pytest.raises(DataError, match=r"'triangle'.*no usable images"):
        scan(tmp_path)


def test_class_of_only_broken_images_is_named_with_the_count(tmp_path: Path) -> None:
    make_dataset(tmp_path, per_class={"circle": 4, "square": 4})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"")
    (tmp_path / "bad" / "y.png").write_text("hello")
    with pytest.raises(DataError, match=r"'bad' \(2 unreadable files\)"):
        scan(tmp_path)


def test_unsupported_files_only(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "doc.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError, match=r"only files of unsupported types: 2 \.pdf"):
        scan(tmp_path)


def test_warnings_for_imbalance_and_small_classes(tmp_path: Path) -> None:
    make_dataset(tmp_path, per_class={"circle": 30, "square": 5, "triangle": 2})
    warnings = " ".join(scan(tmp_path).warnings)
    assert "imbalanced" in warnings and "15.0x" in warnings
    assert "Too few images to split" in warnings and "triangle (2)" in warnings
    assert "Small classes" in warnings and "square (5)" in warnings


def test_split_is_stratified_reproducible_and_seeded(shapes_dir: Path, tmp_path: Path) -> None:
    data = scan(shapes_dir)
    a = make_split(data.labels, data.classes, 0.2, 0.1, seed=42)
    b = make_split(data.labels, data.classes, 0.2, 0.1, seed=42)
    c = make_split(data.labels, data.classes, 0.2, 0.1, seed=7)
    assert a == b and a != c
    per = Counter(zip(data.labels, a, strict=True))
    for label in range(len(data.classes)):
        assert per[(label, "test")] >= 2 and per[(label, "val")] >= 1
    assert Counter(a)["test"] == 9  # ceil(0.2 * 44)
    write_split(tmp_path / "split.csv", data, a)
    paths, labels, subsets = read_split(tmp_path / "split.csv", data.root, data.classes)
    assert paths == data.paths and labels == data.labels and subsets == a


def test_split_refuses_a_class_too_small(tmp_path: Path) -> None:
    make_dataset(tmp_path, per_class={"circle": 10, "square": 2})
    data = scan(tmp_path)
    with pytest.raises(SplitError, match=r"'square' \(2\).*at least 3 images"):
        make_split(data.labels, data.classes, 0.2, 0.1, seed=0)


def test_load_image_composites_transparency_on_white_and_uses_first_gif_frame(tmp_path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "t.png")
    im = load_image(tmp_path / "t.png")
    assert im.mode == "RGB" and im.getpixel((1, 1)) == (255, 255, 255)
    assert im.getpixel((0, 0)) == (0, 0, 255)
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 200, 0), (200, 0, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    r, g, _b = load_image(tmp_path / "a.gif").getpixel((4, 4))
    assert g > 150 and r < 50


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_transforms_shape_and_augmentation_only_when_asked() -> None:
    im = draw_shape("circle", __import__("random").Random(1))
    plain = build_transform(48, (0.5,) * 3, (0.5,) * 3, "none")
    assert plain(im).shape == (3, 48, 48)
    assert (plain(im) == plain(im)).all()  # deterministic
    for kind in ("light", "strong"):
        aug = build_transform(48, (0.5,) * 3, (0.5,) * 3, kind)
        outs = [aug(im) for _ in range(4)]
        assert outs[0].shape == (3, 48, 48)
        assert any(not (o == outs[0]).all() for o in outs[1:])
