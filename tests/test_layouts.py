"""The layouts a dataset comes in (graft.layouts): folders already split into train/val/test,
a labels CSV, and the ambiguous folder (split folders next to class folders) refused; a
split the user made is used as given, its missing parts carved, and audited for leaks."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, SHAPES, make_dataset
from graft import TrainConfig
from graft.audit import audit, check_split, explain
from graft.cli import main
from graft.data import read_labels_csv, scan
from graft.errors import DataError, UsageError
from graft.split import choose_split, write_split


class Notes:
    """A reporter that keeps what it is told."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def info(self, text: str) -> None:
        pass


def _presplit(root: Path, parts: dict[str, int | dict[str, int]]) -> Path:
    """ROOT/<part>/<shape>/ images, each part drawn with its own seed."""
    for seed, (part, n) in enumerate(parts.items()):
        make_dataset(root / part, n, seed=10 + seed)
    return root


def _audit(data, copies: dict[int, int] | None = None):
    """The audit on made-up embeddings: distinct images, except that each key of ``copies``
    is a near-copy of its value."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(data.paths), 32))
    for copy, original in (copies or {}).items():
        emb[copy] = emb[original] + 0.01 * rng.normal(size=32)
    return audit(data.sha256, data.labels, emb, 0.95), emb


# --------------------------------------------------------------------------- split folders


def test_pre_split_folders_are_used_as_given(tmp_path: Path) -> None:
    root = _presplit(tmp_path / "data", {"train": 8, "Validation": 3, "TEST": 3})
    data = scan(root)
    assert data.layout == "split folders" and data.classes == sorted(SHAPES)
    assert Counter(data.given) == {"train": 24, "val": 9, "test": 9}
    assert data.relpath(data.paths[0]) == "train/circle/circle_000.jpg"
    assert data.layout_note == (
        "Layout: pre-split folders train/Validation/TEST (24 / 9 / 9 images, 3 classes)."
    )
    notes = Notes()
    report, emb = _audit(data)
    split = choose_split(TrainConfig(test_size=0.3), data, report, notes, emb)
    assert split.subsets == data.given and "used as given" in split.note
    assert split.source == {
        "layout": "split folders",
        "by_user": ["train", "val", "test"],
        "by_graft": [],
    }
    assert notes.warnings == [
        "The folder's own split is used as given: --test-size 0.3 is ignored: such options "
        "shape only the parts graft carves from the training images."
    ]
    write_split(tmp_path / "split.csv", data, split.subsets, split.groups)
    rows = list(csv.DictReader(open(tmp_path / "split.csv")))
    assert {(r["path"].split("/")[0], r["subset"], r["given_subset"]) for r in rows} == {
        ("train", "train", "train"),
        ("Validation", "val", "val"),
        ("TEST", "test", "test"),
    }


@pytest.mark.parametrize(("parts", "carved"), [(("train", "val"), "test"), (("train",), "val")])
def test_a_missing_part_is_carved_from_train_only_keeping_near_copies_together(
    tmp_path: Path, parts: tuple[str, ...], carved: str
) -> None:
    root = _presplit(tmp_path / "data", {p: 20 if p == "train" else 4 for p in parts})
    data = scan(root)
    train = [i for i, g in enumerate(data.given) if g == "train"]
    copies = dict.fromkeys(train[1:4], train[0])  # four near-copies among the circles
    report, emb = _audit(data, copies)
    split = choose_split(TrainConfig(), data, report, Notes(), emb)
    for i, (g, s) in enumerate(zip(data.given, split.subsets, strict=True)):
        assert g == s or (g == "train" and s in ("val", "test")), i  # only train is carved
    got = Counter(s for g, s in zip(data.given, split.subsets, strict=True) if g == "train")
    share = 0.1 if carved == "val" else 0.2
    assert abs(got[carved] - share * 60) <= 3  # stratified, of the training images
    assert len({split.subsets[i] for i in train[:4]}) == 1
    assert f"{'validation' if carved == 'val' else 'test'}" in split.note and split.grouped
    assert split.source["by_graft"] == (["val", "test"] if parts == ("train",) else ["test"])
    assert split.problems == []
    if parts == ("train",):
        assert data.layout_note.endswith("validation and test will be carved from train.")


def test_split_folders_next_to_class_folders_are_refused_with_both_fixes(tmp_path: Path) -> None:
    make_dataset(tmp_path / "mixed", {"cat": 3, "dog": 3})
    make_dataset(tmp_path / "mixed" / "train", {"cat": 3})
    with pytest.raises(DataError) as err:
        scan(tmp_path / "mixed")
    text = str(err.value)
    assert "mixes folders named like a split (train) with class folders (cat, dog)" in text
    assert "move the class folders into it" in text and "rename its folder" in text

    for part in ("train", "test"):  # split names, but images right inside them
        (tmp_path / "flat" / part).mkdir(parents=True)
        shutil.copy(next((tmp_path / "mixed" / "cat").iterdir()), tmp_path / "flat" / part)
    with pytest.raises(DataError, match=r"flat/train holds no class folders.*rename those"):
        scan(tmp_path / "flat")
    make_dataset(tmp_path / "noval" / "val", {"cat": 3})
    with pytest.raises(DataError, match="holds val but no train folder"):
        scan(tmp_path / "noval")
    make_dataset(tmp_path / "twice" / "train", {"cat": 3})
    make_dataset(tmp_path / "twice" / "val", {"cat": 3})
    make_dataset(tmp_path / "twice" / "valid", {"cat": 3})
    with pytest.raises(DataError, match="val and valid: both are read as the validation"):
        scan(tmp_path / "twice")


def test_class_sets_of_the_parts_are_checked(tmp_path: Path) -> None:
    root = _presplit(
        tmp_path / "data",
        {"train": {"circle": 4, "square": 4}, "test": {"circle": 2, "triangle": 2}},
    )
    with pytest.raises(DataError, match=r"no training images: 'triangle'.*under .*data/train"):
        scan(root)
    shutil.rmtree(root / "test" / "triangle")
    data = scan(root)
    assert any("No test images of 'square'" in w for w in data.warnings)
    # a run is evaluated on one part of a split folder, never on all of it
    with pytest.raises(DataError, match=r"evaluate on one of them, e\.g\. .*data/test"):
        scan(root, classes=["circle", "square"])


# --------------------------------------------------------------------------- leaks


def test_a_leaking_user_split_is_named_with_examples_and_a_fix(tmp_path: Path) -> None:
    root = _presplit(tmp_path / "data", {"train": 4, "test": 3})
    shutil.copy(root / "train/circle/circle_001.png", root / "test/circle/copy.png")
    data = scan(root)
    a = data.paths.index(root / "train/square/square_002.png")
    b = data.paths.index(root / "test/square/square_001.png")
    report, _ = _audit(data, {b: a})
    check_split(report, data.given, data.given)
    assert len(report.straddling_given) == 2 and report.to_dict()["straddling_given_split"] == 2
    found = explain(report, data.classes, data.labels, data.paths, data.root, data.layout)
    leak = next(f for f in found if f.startswith("LEAKAGE in the split you made"))
    assert "train/circle/circle_001.png and test/circle/copy.png (1.000)" in leak
    assert "train/square/square_002.png and test/square/square_001.png" in leak
    assert "Move each copy into the folder of its twin" in leak
    assert not any(f.startswith("LEAKAGE:") for f in found)  # graft's carving added none


def test_graft_scan_says_the_layout_and_warns_of_a_leaking_split(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("GRAFT_ENGINE", "torch")  # not what is tested: spares an ONNX export
    root = _presplit(tmp_path / "data", {"train": 4, "valid": 2})
    shutil.copy(root / "train/square/square_001.png", root / "valid/square/again.png")
    plot = tmp_path / "counts.png"
    code = main(["scan", str(root), "--img-size", "64", "--plot", str(plot), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == "split folders" and out["given_split"] == {
        "train": 12,
        "val": 7,
        "test": 0,
    }
    assert out["layout_note"].endswith("; test will be carved from train.")
    leak = [f for f in out["findings"] if f.startswith("LEAKAGE in the split you made")]
    assert leak and "train/square/square_001.png and valid/square/again.png" in leak[0]
    assert out["audit"]["straddling_given_split"] >= 1
    assert (tmp_path / "counts_duplicates.png").is_file()  # the pairs, drawn


# --------------------------------------------------------------------------- labels CSV


def _labels_csv(tmp_path: Path) -> tuple[Path, Path]:
    """A CSV (semicolons, a byte-order mark, upper-case header and split names) with good
    rows, relative and absolute, and one bad row of each kind."""
    images = make_dataset(tmp_path / "shots" / "imgs", 4)
    elsewhere = make_dataset(tmp_path / "elsewhere", {"square": 1}, seed=5)
    (images / "broken.png").write_bytes(b"not a png")
    lines = ["Path;Label;Split"]
    for i, f in enumerate(sorted(images.rglob("*_00*.*"))):  # lines 2-13, each *_000 in test
        lines.append(
            f"imgs/{f.parent.name}/{f.name};{f.parent.name};{'train' if i % 4 else 'TEST'}"
        )
    absolute = next(elsewhere.rglob("*.*"))
    lines += [
        f"{absolute};square;valid",  # absolute, outside the CSV's folder
        "imgs/missing.png;circle;train",
        "imgs/broken.png;circle;train",
        ";circle;train",
        "imgs/circle/circle_001.png;;train",
        "imgs/circle/circle_002.png;circle;holdout",
        "",
        "imgs\\square\\square_001.png;circle;train",  # Windows separators, listed again
    ]
    path = tmp_path / "shots" / "labels.csv"
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return path, absolute


def test_labels_csv_uses_good_rows_and_lists_each_bad_one(tmp_path: Path) -> None:
    path, absolute = _labels_csv(tmp_path)
    data = read_labels_csv(path)
    assert data.layout == "labels csv" and data.classes == sorted(SHAPES)
    assert data.root == tmp_path.resolve()  # holds the CSV's images and the absolute one
    assert data.relpath(absolute.resolve()) == f"elsewhere/square/{absolute.name}"
    assert Counter(data.given) == {"train": 9, "test": 3, "val": 1}
    reasons = [r for _, r in data.skipped]
    assert reasons == [
        "labels.csv line 15: no such file",
        "labels.csv line 16: not an image (or an unsupported format)",
        "labels.csv line 17: no path",
        "labels.csv line 18: empty label",
        "labels.csv line 19: unknown split 'holdout' (use train, val, valid, validation or test)",
        "labels.csv line 21: listed again (first on line 7 with another label ('square'))",
    ]
    assert data.warnings[0].startswith("6 of the 19 rows of labels.csv are left out: ")
    assert data.layout_note == (
        "Layout: labels CSV labels.csv, split column train/val/test (9 / 1 / 3 images, 3 classes)."
    )


def test_labels_csv_errors_and_the_cli(tmp_path: Path, capsys) -> None:
    path, _ = _labels_csv(tmp_path)
    no_header = tmp_path / "bare.csv"
    no_header.write_text("imgs/circle/circle_000.jpg,circle\n")
    with pytest.raises(DataError, match="needs a header row naming its columns path and label"):
        read_labels_csv(no_header)
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("path,label\ngone.png,cat\n,dog\n")
    with pytest.raises(DataError, match=r"lists no usable image \(2 rows; .*line 2: no such"):
        read_labels_csv(nothing)
    with pytest.raises(UsageError, match=r"--labels-csv .*: no such file"):
        read_labels_csv(tmp_path / "absent.csv")

    plot = tmp_path / "c.png"
    code = main(["scan", "--labels-csv", str(path), "--no-audit", "--json", "--plot", str(plot)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["layout"] == "labels csv" and out["total"] == 13
    assert len(out["skipped"]) == 6 and out["skipped"][0]["reason"].endswith("no such file")
    assert main(["scan", str(tmp_path), "--labels-csv", str(path), "--no-audit"]) == 2
    assert "either a data folder" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    assert "needs ROOT (or --labels-csv FILE)" in capsys.readouterr().err


# --------------------------------------------------------------------------- a run


def test_a_run_on_pre_split_folders_keeps_the_test_folder_and_resumes_it(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("GRAFT_ENGINE", "torch")  # not what is tested: spares ONNX exports
    from graft import fit
    from graft.split import data_from_split

    root = _presplit(tmp_path / "data", {"train": 8, "test": 3})
    shutil.copy(root / "train/circle/circle_001.png", root / "test/circle/leak.png")
    run = tmp_path / "run"
    result = fit(TrainConfig(**{**FAST, "epochs": 1, "fine_tune_epochs": 0}), root, run)
    rows = list(csv.DictReader(open(run / "split.csv")))
    for r in rows:
        assert r["path"].startswith(r["given_subset"] + "/")
        assert r["subset"] == r["given_subset"] or (r["given_subset"], r["subset"]) == (
            "train",
            "val",
        )
    assert Counter(r["subset"] for r in rows)["test"] == 10  # the test folder, all of it
    audit_json = json.loads((run / "audit.json").read_text())
    assert audit_json["split_source"]["by_graft"] == ["val"]
    assert audit_json["straddling_given_split"] >= 1
    assert any("test/circle/leak.png" in f for f in audit_json["findings"])
    assert result.summary["share_warnings"] == []
    assert result.summary["split"]["test"] == 10
    data, split = data_from_split(run, None)  # what --resume and evaluate read back
    assert split.subsets == [r["subset"] for r in rows]
    assert data.given == [r["given_subset"] for r in rows]


def test_the_library_trains_on_a_labels_csv(tmp_path: Path, monkeypatch) -> None:
    from graft import ImageClassifier

    monkeypatch.setenv("GRAFT_ENGINE", "torch")  # not what is tested: spares ONNX exports
    images = make_dataset(tmp_path / "pool", 6)  # folders named anyhow: the CSV labels them
    path = tmp_path / "meta" / "labels.csv"
    path.parent.mkdir()
    rows = [f"../pool/{f.parent.name}/{f.name},{f.parent.name}" for f in images.rglob("*.*")]
    path.write_text("path,label\n" + "\n".join([*rows, "../pool/gone.png,circle"]) + "\n")
    params = {**FAST, "epochs": 1, "fine_tune_epochs": 0}
    clf = ImageClassifier(**params).fit(labels_csv=path, out=tmp_path / "run")
    assert clf.classes_ == sorted(SHAPES)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["labels_csv"] == str(path) and config["data_root"] == str(images.resolve())
    skipped = list(csv.DictReader(open(tmp_path / "run" / "skipped.csv")))
    assert [r["reason"] for r in skipped] == ["labels.csv line 20: no such file"]
    assert json.loads((tmp_path / "run" / "audit.json").read_text())["split_source"] == {
        "layout": "labels csv",
        "by_user": [],
        "by_graft": ["train", "val", "test"],
    }
    with pytest.raises(UsageError, match="either a folder or labels_csv"):
        ImageClassifier(**params).fit(images, labels_csv=path)


def test_a_blank_split_cell_is_listed_with_what_to_do(tmp_path: Path) -> None:
    images = make_dataset(tmp_path / "imgs", per_class=3)
    rows = ["path,label,split"]
    for f in sorted(images.rglob("*.*")):
        rows.append(f"imgs/{f.parent.name}/{f.name},{f.parent.name},train")
    rows[1] = rows[1].rsplit(",", 1)[0] + ","  # the first image: no split given
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    data = read_labels_csv(path)
    reasons = [r for _, r in data.skipped]
    assert reasons == [
        "labels.csv line 2: empty split (with a split column, every row names train, val or "
        "test; leave the column out to let graft split)"
    ]


def test_lr_find_learns_from_the_training_images_graft_train_would_use(
    tmp_path: Path, shapes_dir: Path, trained_run: Path
) -> None:
    """The finder makes the split a run with the same config makes (near-copy groups, the
    folder's own split), so it never learns from a validation or test image."""
    from graft.lr_find import lr_find

    root = _presplit(tmp_path / "data", {"train": 8, "val": 3, "test": 3})
    result = lr_find(root, TrainConfig(img_size=64, batch_size=8), steps=12)
    assert len(result["train_images"]) == 24
    assert all(p.startswith("train/") for p in result["train_images"])
    assert 0 < result["suggested_lr"] < 10
    # a plain folder: the same training images as the run trained with the same config
    with open(trained_run / "split.csv", newline="") as fh:
        trained = sorted(r["path"] for r in csv.DictReader(fh) if r["subset"] == "train")
    result = lr_find(shapes_dir, TrainConfig(**FAST), steps=12)
    assert sorted(result["train_images"]) == trained
