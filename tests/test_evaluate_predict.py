from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft import DataError, ImageClassifier, NotFittedError, RunExistsError
from graft.evaluate import evaluate_run
from graft.predict import Predictor


def test_evaluate_on_the_held_out_split_matches_training_summary(trained_run: Path) -> None:
    result = evaluate_run(trained_run)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert result["n"] == summary["test"]["n"] == summary["split"]["test"] >= 9
    assert result["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert set(result["per_class"]) == {"circle", "square", "triangle"}
    assert sum(m["support"] for m in result["per_class"].values()) == result["n"]
    assert np.asarray(result["confusion_matrix"]).sum() == result["n"]


def test_evaluate_on_another_folder(trained_run: Path, unseen_dir: Path, tmp_path: Path) -> None:
    result = evaluate_run(trained_run, unseen_dir, out_dir=tmp_path / "ev")
    assert result["n"] == 9 and result["accuracy"] >= 0.6
    assert (tmp_path / "ev" / "confusion_matrix.png").is_file()


def test_a_run_that_cannot_be_written_is_evaluated_elsewhere(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # A run on read-only media (as root, chmod would not stop the write: the check is
    # os.access, patched here to refuse the run folder alone).
    import os

    import graft.evaluate
    from graft.cli import main

    real = os.access
    refused = trained_run.resolve()
    monkeypatch.setattr(
        graft.evaluate.os,
        "access",
        lambda path, mode: False if Path(path).resolve() == refused else real(path, mode),
    )
    before = {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir()}
    assert main(["evaluate", str(trained_run)]) == 8  # the system refused, as for --out
    err = capsys.readouterr().err
    assert "is not writable here" in err and "--out DIR" in err
    assert {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir()} == before
    assert main(["evaluate", str(trained_run), "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "evaluation.json").is_file()


def test_evaluate_out_into_another_runs_folder_is_refused(
    trained_run: Path, tmp_path: Path, capsys
) -> None:
    from graft.cli import main

    other = tmp_path / "other-run"
    shutil.copytree(trained_run, other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    assert main(["evaluate", str(trained_run), "--out", str(other)]) == 2
    assert "is another run's folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before


def test_predict_on_paths_that_do_not_exist(
    trained_run: Path, shapes_dir: Path, tmp_path: Path, capsys
) -> None:
    from graft.cli import main

    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(trained_run), str(tmp_path / "nope"), "--out", str(out)]) == 3
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    # one missing among real images is that file's own error row, in plain words
    real = next(shapes_dir.rglob("*.png"))
    assert main(["predict", str(trained_run), str(real), str(tmp_path / "gone.png"), "--json"]) == 7
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gone.png"]["error"] == "no such file (check the path)" and rows[real.name]["label"]


def test_evaluate_folder_with_an_unknown_class_names_it(
    trained_run: Path, unseen_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "ev"
    shutil.copytree(unseen_dir, folder)
    (folder / "hexagon").mkdir()
    shutil.copy(next(unseen_dir.glob("circle/*")), folder / "hexagon" / "x.png")
    with pytest.raises(DataError, match=r"does not know: hexagon.*circle, square, triangle"):
        evaluate_run(trained_run, folder)


def test_predict_gives_probabilities_and_a_per_file_error(
    trained_run: Path, unseen_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    files = sorted(unseen_dir.rglob("*.png")) + sorted(unseen_dir.rglob("*.jpg"))
    predictor = Predictor.from_run(trained_run)
    preds = predictor.predict([*files, bad, tmp_path / "missing.png"], top_k=2)
    assert [p.error is None for p in preds] == [True] * len(files) + [False, False]
    assert "not an image" in preds[-2].error and "no such file" in preds[-1].error
    for p in preds[:-2]:
        assert len(p.top) == 2 and p.top[0][1] >= p.top[1][1]
    probs, failed = predictor.predict_proba(files)
    assert not failed and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    right = sum(p.label == Path(p.path).parent.name for p in preds[:-2])
    assert right >= 6


def test_prediction_is_independent_of_batch_composition(
    trained_run: Path, unseen_dir: Path
) -> None:
    files = sorted(unseen_dir.rglob("*.png"))
    predictor = Predictor.from_run(trained_run)
    together, _ = predictor.predict_proba(files)
    alone = np.concatenate([predictor.predict_proba([f])[0] for f in files])
    assert np.allclose(together, alone, atol=1e-5)


def test_library_facade(
    trained_run: Path, shapes_dir: Path, unseen_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(NotFittedError, match="fit"):
        ImageClassifier().predict(["x.png"])
    clf = ImageClassifier.load(trained_run)
    assert clf.classes_ == ["circle", "square", "triangle"]
    files = sorted(unseen_dir.rglob("*.png"))
    labels = clf.predict(files)
    probs = clf.predict_proba(files)
    assert probs.shape == (len(files), 3)
    assert labels == [clf.classes_[i] for i in probs.argmax(1)]
    assert 0.6 <= clf.score(unseen_dir) <= 1.0
    copy = clf.save(tmp_path / "copy")
    assert np.allclose(ImageClassifier.load(copy).predict_proba(files), probs)
    with pytest.raises(RunExistsError):
        clf.save(copy)


def test_library_fit_returns_self(tmp_path: Path, shapes_dir: Path) -> None:
    from conftest import FAST

    clf = ImageClassifier(**{**FAST, "epochs": 2, "fine_tune_epochs": 0, "head_solver": "adam"})
    assert clf.fit(shapes_dir, out=tmp_path / "run") is clf
    assert clf.classes_ == ["circle", "square", "triangle"]
    assert clf.run_dir_ == tmp_path / "run" and len(clf.history_) == 2
    img = Image.open(next(shapes_dir.glob("square/*.png")))
    img.save(tmp_path / "sq.png")
    assert clf.predict([tmp_path / "sq.png"])[0] in clf.classes_


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_damaged_model_file_is_a_clear_error(
    trained_run: Path, tmp_path: Path, damage: str, capsys
) -> None:
    from graft.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data[10:40] = b"{" * 30  # corrupt the JSON header
    weights.write_bytes(bytes(data))
    (run / "model.onnx").unlink(missing_ok=True)
    assert main(["predict", str(run), str(next(trained_run.glob("*.png")))]) == 4
    err = capsys.readouterr().err
    assert "Could not read" in err and "Traceback" not in err


def test_wilson_interval_and_calibration_numbers() -> None:
    from graft.metrics import calibration, fit_temperature, wilson

    lo, hi = wilson(9, 10)
    assert 0.59 < lo < 0.6 and 0.98 < hi < 0.99  # the textbook values 0.596-0.982
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    calib = calibration(probs, [0, 1, 0, 0])
    # bin 0.9: 50% right at 90% confidence; bin 0.6: 100% right at 60% confidence
    assert calib["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(size=(400, 3))
    logits[np.arange(400), y] += 2.0
    # the same logits made 3x over-confident: the fitted temperature undoes it
    assert fit_temperature(logits * 3, y) == pytest.approx(3 * fit_temperature(logits, y), rel=0.05)


def test_evaluation_reports_intervals_calibration_and_top_losses(trained_run: Path) -> None:
    from safetensors import safe_open

    result = evaluate_run(trained_run)
    lo, hi = result["accuracy_ci95"]
    assert lo <= result["accuracy"] <= hi
    assert all(len(m["recall_ci95"]) == 2 for m in result["per_class"].values())
    assert 0 <= result["calibration"]["ece"] <= 1
    assert (trained_run / "reliability.png").is_file() and (
        trained_run / "top_losses.png"
    ).is_file()
    with safe_open(str(trained_run / "model.safetensors"), "pt") as fh:
        temperature = float(fh.metadata()["temperature"])
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["calibration"]["temperature"] == pytest.approx(temperature)
    if not summary["calibration"]["fitted"]:  # a perfect validation split cannot calibrate
        assert temperature == 1.0
    assert 0.25 <= temperature <= 10 and result["temperature"] == pytest.approx(temperature)
    for item in result["top_losses"]:
        assert item["predicted"] != item["true"] and item["probability"] >= 1 / 3


def test_unknown_threshold_keeps_the_target_precision() -> None:
    from graft.metrics import choose_unknown_threshold, open_set_stats

    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 3, n)
    conf = rng.uniform(0.34, 1.0, n)
    right = rng.uniform(size=n) < conf  # confident predictions are more often right
    pred = np.where(right, y, (y + 1) % 3)
    probs = np.full((n, 3), 0.0)
    probs[np.arange(n), pred] = conf
    probs[np.arange(n), (pred + 2) % 3] = 1 - conf
    t = choose_unknown_threshold(probs, y, 0.9)
    stats = open_set_stats(probs, y, t)
    assert 0 < t < 1 and stats["answered_accuracy"] >= 0.9 and 0 < stats["coverage"] < 1
    assert choose_unknown_threshold(probs, y, 0.0) == 0.0
    assert choose_unknown_threshold(probs, y, 0.5) == 0.0  # already 67% right overall


def test_predict_answers_unknown_below_the_threshold(
    trained_run: Path, unseen_dir: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from graft.model import load_model

    model = load_model(trained_run)
    model.info = replace(model.info, unknown_threshold=0.999999)
    model.save(tmp_path / "model.safetensors")
    files = sorted(unseen_dir.rglob("*.png"))
    preds = Predictor.from_run(tmp_path).predict(files)
    assert all(p.label == "unknown" and p.to_dict()["label"] == "unknown" for p in preds)
    assert all(p.top[0][0] in ("circle", "square", "triangle") for p in preds)
    result = evaluate_run(trained_run)
    assert 0 <= result["open_set"]["coverage"] <= 1


def test_tta_averages_views_and_reports_its_effect(
    trained_run: Path, unseen_dir: Path, tmp_path: Path
) -> None:
    files = sorted(unseen_dir.rglob("*.png"))
    plain, _ = Predictor.from_run(trained_run).predict_proba(files)
    tta, _ = Predictor.from_run(trained_run, tta=True).predict_proba(files)
    assert np.allclose(tta.sum(1), 1, atol=1e-5) and not np.allclose(plain, tta)
    result = evaluate_run(trained_run, unseen_dir, out_dir=tmp_path / "ev", tta=True)
    effect = result["tta_effect"]
    assert result["tta"] is True and effect["accuracy_with"] == result["accuracy"]
    assert 0 <= effect["accuracy_without"] <= 1


def test_lr_find_is_stable_and_plots(shapes_dir: Path, tmp_path: Path) -> None:
    from graft import TrainConfig
    from graft.lr_find import lr_find

    cfg = TrainConfig(img_size=64, batch_size=8)
    a = lr_find(shapes_dir, cfg, tmp_path / "a.png")
    b = lr_find(shapes_dir, cfg, tmp_path / "b.png")
    assert a["suggested_lr"] == b["suggested_lr"] and a["losses"] == b["losses"]
    assert 1e-6 < a["suggested_lr"] < 1.0
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_the_unknown_threshold_sits_just_below_the_last_answered_image() -> None:
    """An image exactly on the threshold would flip with a 1e-6 difference between engines."""
    from graft.metrics import choose_unknown_threshold

    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    y = [0, 0, 0, 1]  # the three confident ones right: 100% precision down to 0.8
    t = choose_unknown_threshold(probs, y, 0.99)
    assert 0.8 - 1e-4 <= t < 0.8 and t > 0.7
    close = np.array([[0.95, 0.05], [0.8, 0.2], [0.79999, 0.20001]])
    t = choose_unknown_threshold(close, [0, 0, 1], 0.99)
    assert 0.79999 < t < 0.8  # halfway, so the next image down stays unknown
