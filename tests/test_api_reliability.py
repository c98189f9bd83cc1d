"""``ImageClassifier``'s sharp edges: a single path is one image (not its characters), empty
and wrong inputs get a clear GraftError, and ``save`` never overwrites or half-writes."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from graft import ImageClassifier
from graft.errors import (
    DataError,
    NotFittedError,
    RunExistsError,
    SystemResourceError,
    UsageError,
)


@pytest.fixture(scope="module")
def clf(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageClassifier:
    run = tmp_path_factory.mktemp("api") / "run"
    shutil.copytree(trained_run, run)  # save() tests must never touch the shared run
    return ImageClassifier.load(run)


@pytest.fixture(scope="module")
def files(unseen_dir: Path) -> list[Path]:
    return sorted(unseen_dir.rglob("*.png"))[:3]


def test_a_single_path_is_one_image(clf: ImageClassifier, files: list[Path]) -> None:
    many = clf.predict(files)
    assert isinstance(many, list) and len(many) == 3
    assert clf.predict(str(files[0])) == many[0]  # a str: one image, not its characters
    assert clf.predict(files[0]) == many[0]
    probs = clf.predict_proba(files)
    assert probs.shape == (3, 3)
    assert np.allclose(clf.predict_proba(str(files[1])), probs[1])
    assert clf.predict(iter(files)) == many  # any iterable of paths


def test_an_empty_list_gives_empty_answers(clf: ImageClassifier) -> None:
    assert clf.predict([]) == []
    assert clf.predict_proba([]).shape == (0, 3)


@pytest.mark.parametrize("bad", [123, None, b"a.png", [1, 2], ["a.png", None], {"a": 1}, ""])
def test_wrong_kinds_of_paths_are_usage_errors(clf: ImageClassifier, bad: object) -> None:
    with pytest.raises(UsageError, match="path"):
        clf.predict(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="path"):
        clf.predict_proba(bad)  # type: ignore[arg-type]


def test_unreadable_images_are_named(clf: ImageClassifier, files: list[Path], tmp_path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png"):
        clf.predict([files[0], text])


def test_before_fit_every_method_says_to_fit(tmp_path: Path) -> None:
    fresh = ImageClassifier()
    for call in (
        lambda: fresh.predict("x.png"),
        lambda: fresh.predict_proba(["x.png"]),
        lambda: fresh.score(tmp_path),
        lambda: fresh.save(tmp_path / "copy"),
        lambda: fresh.classes_,
    ):
        with pytest.raises(NotFittedError, match="fit"):
            call()
    assert not hasattr(fresh, "run_dir_")  # NotFittedError is an AttributeError
    assert not (tmp_path / "copy").exists()


def test_unknown_parameters_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="epochz"):
        ImageClassifier(epochz=3)
    with pytest.raises(UsageError, match="run"):
        ImageClassifier.load(42)  # type: ignore[arg-type]


def test_save_refuses_what_it_must_not_overwrite(clf: ImageClassifier, tmp_path: Path) -> None:
    a_file = tmp_path / "model.bin"
    a_file.write_text("mine")
    with pytest.raises(RunExistsError, match="is a file"):
        clf.save(a_file, force=True)
    assert a_file.read_text() == "mine"

    someone = tmp_path / "someone"
    someone.mkdir()
    (someone / "thesis.tex").write_text("keep")
    with pytest.raises(RunExistsError, match="force=True"):
        clf.save(someone)
    with pytest.raises(RunExistsError, match="not a graft run"):
        clf.save(someone, force=True)
    assert [p.name for p in someone.iterdir()] == ["thesis.tex"]

    for own in (clf.run_dir_, Path(clf.run_dir_) / "inside"):
        with pytest.raises(UsageError, match="own run folder"):
            clf.save(own, force=True)
    assert (Path(clf.run_dir_) / "model.safetensors").is_file()

    with pytest.raises(UsageError, match="Could not save"):
        clf.save(a_file / "copy")  # a parent that is a file


def test_save_with_force_replaces_only_graft_files(clf: ImageClassifier, tmp_path: Path) -> None:
    copy = clf.save(tmp_path / "deep" / "copy")  # missing parents are created
    assert (copy / "model.safetensors").is_file()
    (copy / "my-notes.txt").write_text("mine")
    with pytest.raises(RunExistsError):
        clf.save(copy)
    again = clf.save(copy, force=True)
    assert (again / "my-notes.txt").read_text() == "mine"
    assert ImageClassifier.load(again).classes_ == clf.classes_


def test_a_refused_write_is_a_system_error_and_leaves_nothing(
    clf: ImageClassifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graft.api

    def full_disk(source: Path, target: Path) -> None:
        (target / "config.json").write_text("{")  # a first file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target / "model.bin"))

    monkeypatch.setattr(graft.api, "_copy_tree", full_disk)
    with pytest.raises(SystemResourceError, match="disk is full"):
        clf.save(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()  # no half-copied run


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders"
)
def test_save_into_a_read_only_folder(clf: ImageClassifier, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SystemResourceError, match="permission denied"):
            clf.save(locked / "copy")
    finally:
        locked.chmod(0o700)
