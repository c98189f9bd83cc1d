"""``graft.runtime``: ``rank_classes``, the one place probabilities become an answer (top-k
classes and "unknown") for ``graft predict``, ``graft serve`` and exported models; and the
exported ``graft_runtime.py`` script, which answers every good image and names each bad one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft.runtime import rank_classes

CLASSES = ["cat", "dog", "fox"]


def test_top_classes_best_first() -> None:
    top, unknown = rank_classes(np.array([0.2, 0.7, 0.1], np.float32), CLASSES, 2, 0.5)
    assert [c for c, _ in top] == ["dog", "cat"]
    assert top[0][1] == pytest.approx(0.7) and top[1][1] == pytest.approx(0.2)
    assert all(isinstance(p, float) for _, p in top)
    assert unknown is False


def test_top_k_larger_than_the_classes_gives_every_class() -> None:
    top, _ = rank_classes(np.array([0.2, 0.7, 0.1]), CLASSES, 10, 0.0)
    assert [c for c, _ in top] == ["dog", "cat", "fox"]


def test_top_k_below_one_still_gives_the_best_class() -> None:
    top, _ = rank_classes(np.array([0.2, 0.7, 0.1]), CLASSES, 0, 0.0)
    assert top == [("dog", pytest.approx(0.7))]


def test_ties_keep_the_order_of_the_classes() -> None:
    top, _ = rank_classes(np.array([0.25, 0.375, 0.375]), CLASSES, 3, 0.0)
    assert [c for c, _ in top] == ["dog", "fox", "cat"]
    # many classes (numpy's default sort is not stable beyond small arrays)
    classes = [f"c{i}" for i in range(100)]
    top, _ = rank_classes(np.full(100, 0.01, np.float32), classes, 100, 0.0)
    assert [c for c, _ in top] == classes


def test_threshold_boundary() -> None:
    p = np.array([0.5, 0.25, 0.25])  # exact in binary: no rounding at the boundary
    assert rank_classes(p, CLASSES, 1, 0.5)[1] is False  # equal to the threshold: answered
    assert rank_classes(p, CLASSES, 1, np.nextafter(0.5, 1.0))[1] is True  # above: unknown
    assert rank_classes(p, CLASSES, 1, 0.49)[1] is False


def test_threshold_zero_answers_everything() -> None:
    uniform = np.full(3, 1 / 3, np.float32)
    assert rank_classes(uniform, CLASSES, 3, 0.0)[1] is False
    assert rank_classes(np.zeros(3), CLASSES, 3, 0.0)[1] is False


def test_float32_probabilities_compare_as_python_floats() -> None:
    # the top probability is reported as float(p[j]) and compared unrounded
    p = np.array([0.9, 0.05, 0.05], np.float32)
    top, unknown = rank_classes(p, CLASSES, 1, float(p[0]))
    assert top[0][1] == float(p[0]) and unknown is False


def test_probabilities_must_match_the_classes() -> None:
    with pytest.raises(ValueError, match="2 probabilities for 3 classes"):
        rank_classes(np.array([0.5, 0.5]), CLASSES, 1, 0.0)


# ------------------------------------------------------------------ the exported script


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from graft.export import export_run

    return export_run(trained_run, "onnx", tmp_path_factory.mktemp("runtime") / "export")


def _script(export: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python EXPORT/graft_runtime.py ARGS...`` in a fresh interpreter."""
    command = [sys.executable, str(export / "graft_runtime.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, unseen_dir: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    good_jpg = next(unseen_dir.rglob("*.jpg"))
    files = {
        "text": folder / "notes.png",
        "truncated": folder / "cut.jpg",
        "folder": folder / "a-folder.png",
        "missing": folder / "missing.png",
        "too large": folder / "huge.png",
    }
    files["text"].write_text("not an image")
    files["truncated"].write_bytes(good_jpg.read_bytes()[:300])
    files["folder"].mkdir()
    # 100 megapixels, over Pillow's default limit, but a 1-bit PNG of a few kilobytes
    Image.new("1", (10_000, 10_000)).save(files["too large"])
    return files


def test_script_answers_good_images_and_names_each_bad_one(
    exported: Path, bad_files: dict[str, Path], unseen_dir: Path, tmp_path: Path
) -> None:
    good = sorted(unseen_dir.rglob("*.*"))[:2]
    result = _script(exported, exported, good[0], *bad_files.values(), good[1], cwd=tmp_path)
    assert result.returncode == 7, result.stderr
    assert "Traceback" not in result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert len(lines) == 7
    for path in good:
        assert not lines[str(path)].startswith("error"), lines[str(path)]
    expected = {
        "text": "not an image",
        "truncated": "truncated",
        "folder": "a folder",
        "missing": "no such file",
        "too large": "image too large",
    }
    for kind, path in bad_files.items():
        assert lines[str(path)].startswith("error: ") and expected[kind] in lines[str(path)]
    assert "5 of 7 file(s) could not be predicted" in result.stderr


def test_library_predict_gives_an_entry_per_image(
    exported: Path, bad_files: dict[str, Path], unseen_dir: Path
) -> None:
    from graft.runtime import ExportedModel

    model = ExportedModel(exported)
    good = sorted(unseen_dir.rglob("*.png"))[0]
    results = model.predict([good, bad_files["missing"], bad_files["too large"]], batch_size=2)
    assert [("error" in r) for r in results] == [False, True, True]
    assert results[0]["label"] in [*model.classes, "unknown"]


def test_non_finite_scores_are_never_reported(exported: Path, unseen_dir: Path) -> None:
    from graft.runtime import NON_FINITE, ExportedModel

    model = ExportedModel(exported)
    assert model.has_familiarity  # the last column: NaN there is as broken as in a probability
    width = len(model.classes) + 1
    model._run = lambda x: np.full((len(x), width), np.nan, np.float32)
    results = model.predict(sorted(unseen_dir.rglob("*.png"))[:2])
    assert results == [{"error": NON_FINITE}] * 2

    def nan_familiarity(x: np.ndarray) -> np.ndarray:
        out = np.full((len(x), width), 1.0 / len(model.classes), np.float32)
        out[:, -1] = np.nan
        return out

    model._run = nan_familiarity
    results = model.predict(sorted(unseen_dir.rglob("*.png"))[:2])
    assert results == [{"error": NON_FINITE}] * 2


def _break(folder: Path, how: str) -> None:
    if how == "no metadata":
        (folder / "graft.json").unlink()
    elif how == "damaged metadata":
        (folder / "graft.json").write_text("{not json")
    elif how == "metadata without classes":
        meta = json.loads((folder / "graft.json").read_text())
        meta["classes"] = []
        (folder / "graft.json").write_text(json.dumps(meta))
    elif how == "no model file":
        (folder / "model.onnx").unlink()
    else:  # a damaged model file
        (folder / "model.onnx").write_bytes(b"not a model")


@pytest.mark.parametrize(
    "how",
    ["no metadata", "damaged metadata", "metadata without classes", "no model file", "damaged"],
)
def test_script_refuses_a_broken_export_folder(
    exported: Path, unseen_dir: Path, tmp_path: Path, how: str
) -> None:
    broken = tmp_path / "export"
    shutil.copytree(exported, broken)
    _break(broken, how)
    result = _script(exported, broken, next(unseen_dir.rglob("*.png")), cwd=tmp_path)
    assert result.returncode == 6 and result.stdout == ""
    assert result.stderr.startswith("graft_runtime: error: ") and "Traceback" not in result.stderr
    assert str(broken) in result.stderr


@pytest.mark.parametrize("args", [[], ["only-a-folder"]])
def test_script_usage(exported: Path, tmp_path: Path, args: list[str]) -> None:
    result = _script(exported, *args, cwd=tmp_path)
    assert result.returncode == 2 and "usage: python graft_runtime.py" in result.stderr
