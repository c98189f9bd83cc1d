"""`graft export`: every format matches graft's own predict on real image files, and the
export folder runs without graft or torch (ONNX, OpenVINO)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import draw_shape
from graft.cli import main
from graft.errors import RunExistsError
from graft.export import EXPORT_ATOL, EXPORT_FILES, FORMATS, export_run
from graft.predict import Predictor


@pytest.fixture(scope="module")
def probe_images(tmp_path_factory: pytest.TempPathFactory, unseen_dir: Path) -> list[Path]:
    """Unseen PNG/JPEG files plus the awkward ones preprocessing must agree on: a large JPEG
    (decoded at reduced scale), a transparent PNG, an EXIF-rotated JPEG, a grey image."""
    import random

    folder = tmp_path_factory.mktemp("probe")
    rng = random.Random(7)
    big = draw_shape("circle", rng, size=480)
    big.save(folder / "big.jpg", quality=90)
    rgba = draw_shape("square", rng).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    rgba.save(folder / "transparent.png")
    rotated = draw_shape("triangle", rng, size=96)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    rotated.save(folder / "rotated.jpg", exif=exif)
    draw_shape("circle", rng).convert("L").save(folder / "grey.png")
    # of none of the classes: the familiarity score must answer them the same way everywhere
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = (0, 200, 40)
    Image.fromarray(stripes).save(folder / "stripes.png")
    return sorted(unseen_dir.rglob("*.*")) + sorted(folder.iterdir())


STANDALONE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from graft_runtime import ExportedModel
model = ExportedModel(sys.argv[1])
probs = model.predict_proba(sys.argv[2:])
assert "graft" not in sys.modules, "the export must not need graft"
answers = model.predict(sys.argv[2:])
print(json.dumps({"probs": probs.tolist(), "torch": "torch" in sys.modules,
                  "labels": [r["label"] for r in answers],
                  "familiarity": [r["familiarity"] for r in answers]}))
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_graft_predict(
    fmt: str, trained_run: Path, probe_images: list[Path], tmp_path: Path
) -> None:
    out = export_run(trained_run, fmt, tmp_path / f"export-{fmt}")
    meta = json.loads((out / "graft.json").read_text())
    assert meta["format"] == fmt and (out / meta["model_file"]).is_file()
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["preprocessing"]["size"] == 64 and len(meta["preprocessing"]["mean"]) == 3
    assert {"graft_runtime.py", "MODEL_CARD.md", "report.html"} <= {p.name for p in out.iterdir()}
    # the manifest lists exactly what was written, all of it names --force may replace
    assert (
        set(meta["files"]) == {p.name for p in out.iterdir()} and set(meta["files"]) <= EXPORT_FILES
    )

    # A fresh interpreter that imports only the export folder's own runtime.
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(out), *map(str, probe_images)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    got = json.loads(result.stdout)
    assert got["torch"] is (fmt == "torchscript")  # ONNX and OpenVINO run without torch

    predictor = Predictor.from_run(trained_run)
    expected, familiarity, failed = predictor.predict_scores(probe_images)
    assert not failed and familiarity is not None
    diff = np.abs(np.asarray(got["probs"]) - expected).max()
    assert diff <= EXPORT_ATOL[fmt], f"{fmt}: max probability difference {diff:.2e}"
    # the familiarity score travels in the graph: the same values, the same "unknown"s
    assert meta["familiarity"]["threshold"] == predictor.info.familiarity_threshold
    fdiff = np.abs(np.asarray(got["familiarity"]) - familiarity).max()
    assert fdiff <= EXPORT_ATOL[fmt], f"{fmt}: max familiarity difference {fdiff:.2e}"
    assert got["labels"] == [p.label for p in predictor.predict(probe_images)]
    assert "unknown" in got["labels"][-2:]  # noise and stripes are of none of the classes
    assert got["labels"][:3] == [predictor.classes[i] for i in expected[:3].argmax(1)]


def test_model_card_states_data_metrics_and_limits(trained_run: Path, tmp_path: Path) -> None:
    out = export_run(trained_run, "onnx", tmp_path / "card")
    card = (out / "MODEL_CARD.md").read_text()
    summary = json.loads((trained_run / "summary.json").read_text())
    acc = f"{100 * summary['test']['accuracy']:.1f}%"
    for needed in (
        "## Data",
        "## Metrics",
        "## Intended use",
        "## Limits",
        "95% interval",
        acc,
        "| circle |",
        "efficientnet_lite0",
        "graft_runtime.py",
        f"brought down to {summary['detail_size']} px",  # the preprocessing, all of it
    ):
        assert needed in card, needed


def test_export_never_overwrites_silently(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exp"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    stamp = (out / "graft.json").read_text()
    with pytest.raises(RunExistsError):
        export_run(trained_run, "onnx", out)
    assert main(["export", str(trained_run), "--out", str(out)]) == 5
    assert "--force" in capsys.readouterr().err
    assert (out / "graft.json").read_text() == stamp  # untouched
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", str(trained_run), "--out", str(other), "--force"]) == 5
    assert (other / "notes.txt").read_text() == "keep me"
    capsys.readouterr()
    assert main(["export", str(trained_run), "--out", str(out), "--force", "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: errors only
    assert not list(tmp_path.glob(".exp.*"))  # no staging folder left behind


def test_export_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path)]) == 6
    assert "No trained model" in capsys.readouterr().err


def test_trimmed_preprocessing_travels_with_the_model(
    trained_run: Path, probe_images: list[Path], tmp_path: Path
) -> None:
    """Trimming is part of the model: graft's predict and the exported runtime both crop the
    background first (or both do not), and agree."""
    import shutil
    from dataclasses import replace

    from graft.model import load_model
    from graft.runtime import ExportedModel, trim_background

    run = tmp_path / "trimmed"
    shutil.copytree(trained_run, run)
    (run / "model.onnx").unlink(missing_ok=True)
    model = load_model(run)
    flipped = not model.info.trim
    model.info = replace(model.info, trim=flipped)
    model.save(run / "model.safetensors")

    out = export_run(run, "onnx", tmp_path / "export")
    assert json.loads((out / "graft.json").read_text())["preprocessing"]["trim"] is flipped
    got = ExportedModel(out).predict_proba(probe_images)
    expected, failed = Predictor.from_run(run).predict_proba(probe_images)
    assert not failed and np.abs(got - expected).max() <= EXPORT_ATOL["onnx"]
    other, _ = Predictor.from_run(trained_run).predict_proba(probe_images)
    assert np.abs(other - expected).max() > 1e-3  # trimming changes what the model sees

    sprite = Image.new("RGB", (200, 100), (255, 255, 255))
    sprite.paste((200, 30, 30), (90, 40, 110, 60))  # a 20x20 object far from the edges
    trimmed = trim_background(sprite)
    assert trimmed.size[0] == trimmed.size[1] and 20 < trimmed.size[0] < 30
    photo = Image.effect_noise((64, 48), 60).convert("RGB")  # content fills the frame
    assert trim_background(photo) is photo


def test_the_detail_size_travels_with_the_model(
    trained_run: Path, probe_images: list[Path], tmp_path: Path
) -> None:
    """Saved in the model and the export; PyTorch's transform, graft's fast predict and the
    exported runtime bring a large picture down alike, and it changes what the model sees."""
    import shutil
    from dataclasses import replace

    from graft.model import load_model
    from graft.modelinfo import read_metadata
    from graft.runtime import ExportedModel, ExportError

    measured = load_model(trained_run).info.detail_size
    assert 0 < measured < 64  # the test shapes, trimmed, are smaller than the 64 px input
    run = tmp_path / "detail"
    shutil.copytree(trained_run, run)
    (run / "model.onnx").unlink(missing_ok=True)
    model = load_model(run)
    model.info = replace(model.info, detail_size=16)
    model.save(run / "model.safetensors")
    assert json.loads(read_metadata(run / "model.safetensors")["detail_size"]) == 16

    out = export_run(run, "onnx", tmp_path / "export")
    assert json.loads((out / "graft.json").read_text())["preprocessing"]["detail_size"] == 16
    exported = ExportedModel(out).predict_proba(probe_images)
    fast, failed = Predictor.from_run(run).predict_proba(probe_images)
    torch_path, _ = Predictor.from_run(run, backend="torch").predict_proba(probe_images)
    assert not failed
    assert np.abs(exported - fast).max() <= EXPORT_ATOL["onnx"]
    assert np.abs(torch_path - fast).max() <= 1e-4
    before, _ = Predictor.from_run(trained_run).predict_proba(probe_images)
    assert np.abs(before - fast).max() > 1e-3
    meta = json.loads((out / "graft.json").read_text())
    meta["preprocessing"]["detail_size"] = -5  # an edited export is refused, not guessed
    (out / "graft.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"damaged.*sizes"):
        ExportedModel(out)


def test_force_replaces_only_the_files_graft_wrote(trained_run: Path, tmp_path: Path) -> None:
    out = export_run(trained_run, "onnx", tmp_path / "exp")
    meta = json.loads((out / "graft.json").read_text())
    assert set(meta["files"]) == {p.name for p in out.iterdir()}  # the manifest
    (out / "notes.txt").write_text("mine")
    (out / "predictions").mkdir()
    (out / "predictions" / "holiday.csv").write_text("path,label\n")

    again = export_run(trained_run, "torchscript", out, force=True)
    names = {p.name for p in again.iterdir()}
    assert {"model.pt", "notes.txt", "predictions"} <= names and "model.onnx" not in names
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "predictions" / "holiday.csv").read_text() == "path,label\n"
    assert json.loads((out / "graft.json").read_text())["format"] == "torchscript"
    assert not list(tmp_path.glob(".exp.*"))

    # A manifest edited to claim the user's files still never deletes them.
    meta = json.loads((out / "graft.json").read_text())
    meta["files"] += ["notes.txt", "predictions", "../outside.txt"]
    (out / "graft.json").write_text(json.dumps(meta))
    (tmp_path / "outside.txt").write_text("outside")
    export_run(trained_run, "onnx", out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "predictions").is_dir()
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert "model.pt" not in {p.name for p in out.iterdir()}


def test_force_refuses_a_folder_that_only_looks_like_an_export(
    trained_run: Path, tmp_path: Path
) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "graft.json").write_text('{"format": "onnx"}')  # someone else's graft.json
    (other / "model.onnx").write_text("my own model")
    with pytest.raises(RunExistsError, match="not a graft export"):
        export_run(trained_run, "onnx", other, force=True)
    assert (other / "model.onnx").read_text() == "my own model"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_run(trained_run, "onnx", empty) / "model.onnx").is_file()


def test_an_export_the_system_refuses_is_a_clear_error(trained_run: Path, tmp_path: Path) -> None:
    from graft.errors import UsageError

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="Could not write the export"):
        export_run(trained_run, "onnx", blocker / "export")  # a parent that is a file
