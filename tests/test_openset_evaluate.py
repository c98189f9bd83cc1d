"""`graft evaluate RUN --others DIR`: how well "unknown" keeps out images of none of the
classes (issue 14). The model is the session's trained_run (shapes, with a familiarity
score), always copied first; the "others" are images the tests draw: noise and scribbled
lines, which no shape class looks like."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from graft.cli import main


def draw_others(folder: Path, n: int = 8, seed: int = 0) -> list[Path]:
    """``n`` images of none of the classes, in nested folders and mixed formats: noise, and
    bright lines on a dark ground."""
    rng, r = np.random.default_rng(seed), random.Random(seed)
    written = []
    for i in range(n):
        sub = folder / ("noise" if i % 2 else "lines/deeper")
        sub.mkdir(parents=True, exist_ok=True)
        if i % 2:
            im = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        else:
            im = Image.new("RGB", (64, 64), (r.randint(0, 60),) * 3)
            d = ImageDraw.Draw(im)
            for _ in range(6):
                xy = [(r.randint(0, 63), r.randint(0, 63)) for _ in range(2)]
                d.line(xy, fill=(255, r.randint(0, 255), 0), width=3)
        path = sub / (f"o{i}.png" if i % 3 else f"o{i}.jpg")
        im.save(path)
        written.append(path)
    return written


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` with a digest of its bytes (folders as 'dir')."""
    return {
        str(p.relative_to(folder)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def evaluate_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(["evaluate", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def test_others_are_rejected_more_often_than_own_images(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    others = draw_others(tmp_path / "others")
    before = snapshot(run)
    code, result = evaluate_json([str(run), "--others", str(tmp_path / "others")], capsys)
    assert code == 0
    o = result["others"]
    assert o["score"] == "familiarity"
    assert o["n_others"] == len(others) and o["n_in_class"] == result["n"]
    for key in ("auroc", "fpr_at_95_tpr", "others_rejected", "in_class_answered"):
        assert 0.0 <= o[key] <= 1.0, key
    # the model never saw noise or lines: they look less familiar than its own test images
    assert o["auroc"] > 0.8
    assert o["others_rejected"] > 1.0 - o["in_class_answered"]
    assert o["threshold"] == pytest.approx(o["familiarity_threshold"])
    assert o["failed"] == []
    saved = json.loads((run / "evaluation.json").read_text())
    assert saved["others"] == o
    with Image.open(run / "familiarity.png") as im:
        assert im.info.get("Software") == "graft"
    # nothing already in the run folder is lost; the model is untouched
    after = snapshot(run)
    assert set(before) <= set(after)
    assert after["model.safetensors"] == before["model.safetensors"]
    assert "familiarity.png" in json.loads((run / "graft-files.json").read_text())["files"]
    from graft.report import build_report

    html = build_report(run)
    assert "Images of none of the classes" in html and "cannot promise" in html
    assert base64.b64encode((run / "familiarity.png").read_bytes()).decode() in html


def test_console_summary_and_stale_histogram(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The terminal says what was measured; a later evaluation without --others removes
    graft's own histogram (it would describe another evaluation)."""
    monkeypatch.setenv("COLUMNS", "400")  # rich folds long paths at the terminal's width
    draw_others(tmp_path / "others", n=4)
    assert main(["evaluate", str(run), "--others", str(tmp_path / "others")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "answered 'unknown'" in out and "AUROC" in out and "familiarity.png" in out
    assert (run / "familiarity.png").is_file()
    assert main(["evaluate", str(run)]) == 0
    assert not (run / "familiarity.png").exists()
    assert "others" not in json.loads((run / "evaluation.json").read_text())


def _missing(d: Path) -> Path:
    return d / "missing"


def _a_file(d: Path) -> Path:
    Image.new("RGB", (8, 8)).save(d / "a.png")
    return d / "a.png"


def _empty(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _no_images(d: Path) -> Path:
    (d / "txt").mkdir()
    (d / "txt" / "notes.txt").write_text("not an image")
    return d / "txt"


def _unreadable(d: Path) -> Path:
    draw_others(d / "locked", n=2)
    (d / "locked").chmod(0)  # refused to a user; root reads anyway: see the test
    return d / "locked"


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (_missing, 3, "does not exist"),
        (_a_file, 2, "is a file"),
        (_empty, 3, "holds no images (no files"),
        (_no_images, 3, "only 1 file(s) of other types"),
        (_unreadable, 8, "cannot be read"),
    ],
    ids=["missing", "a-file", "empty", "no-images", "unreadable"],
)
def test_bad_others_folder_is_refused_before_anything_is_written(
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Path], Path],
    code: int,
    words: str,
) -> None:
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    target = make(bad_dir)
    if code == 8 and os.access(target, os.R_OK):  # root: the system refuses as it would
        real = os.scandir

        def refuse(path: object = ".") -> object:
            if Path(str(path)) == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "scandir", refuse)
    try:
        before = snapshot(run)
        assert main(["evaluate", str(run), "--others", str(target)]) == code
        err = " ".join(capsys.readouterr().err.split())
        assert words in err and f"--others {target}" in err
        assert snapshot(run) == before
    finally:
        if target.is_dir():
            target.chmod(0o755)  # so pytest can remove it


def test_unreadable_files_in_others_are_listed_and_skipped(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "others"
    good = draw_others(folder, n=4)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "noise" / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: not even tried")
    code, result = evaluate_json([str(run), "--others", str(folder)], capsys)
    assert code == 7  # finished, some files skipped
    o = result["others"]
    assert o["n_others"] == len(good)
    assert sorted(Path(f["path"]).name for f in o["failed"]) == ["broken.png", "empty.jpg"]
    assert all(f["reason"] for f in o["failed"])
    assert (run / "familiarity.png").is_file()


def test_others_that_are_all_unreadable_write_nothing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "others"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"")
    before = snapshot(run)
    assert main(["evaluate", str(run), "--others", str(folder)]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "none of its 2 image file(s) could be read" in err
    after = snapshot(run)
    changed = {k for k in before if after.get(k) != before[k]} | (set(after) - set(before))
    # only the engine's graph of these very weights may be made (graft's cache, not results)
    assert changed <= {"model.onnx", "model.onnx.json"}


def test_a_histogram_graft_did_not_write_is_never_replaced(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draw_others(tmp_path / "others", n=2)
    mine = run / "familiarity.png"
    Image.new("RGB", (8, 8), "red").save(mine)
    before = snapshot(run)
    assert main(["evaluate", str(run), "--others", str(tmp_path / "others")]) == 2
    assert "not written by graft" in capsys.readouterr().err
    assert snapshot(run) == before


def test_model_without_familiarity_falls_back_to_top_probability(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model trained with --unknown-keep 0 (or by an older graft) has no familiarity: the
    top probability is measured instead, and the result says so."""
    from graft.model import load_model

    model = load_model(run / "model.safetensors")
    model.familiarity = None
    model.info = replace(model.info, familiarity_k=0, familiarity_threshold=-1.0)
    model.save(run / "model.safetensors")
    assert load_model(run / "model.safetensors").familiarity is None
    draw_others(tmp_path / "others", n=4)
    code, result = evaluate_json([str(run), "--others", str(tmp_path / "others")], capsys)
    assert code == 0
    o = result["others"]
    assert o["score"] == "top probability"
    assert "no familiarity score" in o["score_meaning"]
    assert o["familiarity_threshold"] is None
    assert o["threshold"] == pytest.approx(result["open_set"]["threshold"])
    assert 0.0 <= o["auroc"] <= 1.0 and 0.0 <= o["others_rejected"] <= 1.0
    assert (run / "familiarity.png").is_file()
    from graft.report import build_report

    assert "has no familiarity score" in build_report(run)


def test_others_with_a_folder_writes_beside_that_evaluation(
    run: Path, unseen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draw_others(tmp_path / "others", n=4)
    code, result = evaluate_json(
        [str(run), str(unseen_dir), "--others", str(tmp_path / "others")], capsys
    )
    assert code == 0
    out = Path(result["output_dir"])
    assert out.parent == run and (out / "familiarity.png").is_file()
    assert result["others"]["n_in_class"] == result["n"]
    from graft.report import build_report

    html = build_report(run)
    assert html.count("Images of none of the classes") >= 1


def test_report_and_model_card_state_the_unknown_rule(run: Path) -> None:
    """Without any --others evaluation the report explains the rule in plain words, and
    the model card states the familiarity threshold and k beside the confidence rule."""
    from graft.export import model_card
    from graft.model import load_model
    from graft.report import build_report

    model = load_model(run / "model.safetensors")
    info = model.info
    assert info.familiarity_k > 0
    html = " ".join(build_report(run).split())
    assert f"below {info.familiarity_threshold:.3f}" in html
    assert "What <i>unknown</i> means and what it cannot promise" in html
    assert "Images of none of the classes" not in html  # no --others evaluation yet
    meta = {"format": "onnx", "model_file": "model.onnx", "model_sha256": "0" * 64}
    card = model_card(model, run, meta)
    line = next(x for x in card.splitlines() if x.startswith("- Unknown:"))
    assert "those of the most similar training image" in line
    assert "validation images under strong augmentation" in line  # the reference used
    assert f"below {info.familiarity_threshold:.3f}" in line
    model.familiarity = None
    model.info = replace(info, familiarity_k=0, familiarity_threshold=-1.0)
    line = next(x for x in model_card(model, run, meta).splitlines() if "- Unknown:" in x)
    assert "familiarity" in line and "most similar training image" not in line


def test_fpr_at_95_keeps_at_least_95_percent_of_the_in_class_images() -> None:
    """On 9 in-class images a 95% cut must keep all 9 (an interpolated quantile kept 8)."""
    from graft.evaluate import separation

    inside = np.linspace(0.5, 0.9, 9)
    outside = np.array([0.45, 0.55, 0.6])
    assert separation(inside, outside)["fpr_at_95_tpr"] == pytest.approx(2 / 3)


def test_others_that_are_empty_or_inside_the_run_are_refused(run: Path, capsys) -> None:
    for others in ("", str(run)):
        assert main(["evaluate", str(run), "--others", others]) == 2
        assert "--others" in capsys.readouterr().err


def test_a_matplotlib_png_of_the_users_is_never_deleted(run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = run / "familiarity.png"
    mine.unlink(missing_ok=True)
    plt.plot([1, 2])
    plt.savefig(mine)  # Software: Matplotlib, not graft's mark
    plt.close()
    before = mine.read_bytes()
    assert main(["evaluate", str(run)]) == 0
    assert mine.read_bytes() == before
