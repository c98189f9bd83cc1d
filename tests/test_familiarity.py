"""Open set: the familiarity score answers "unknown" for images of none of the classes, the
same way in graft predict, graft serve, exported models and ImageClassifier; ``--unknown off``
answers every image; a tampered score is refused."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import FAST, make_dataset
from graft.cli import main
from graft.errors import UsageError, WeightsError
from graft.familiarity import Familiarity, balanced_sample, fit_familiarity
from graft.model import load_model
from graft.predict import Predictor


@pytest.fixture(scope="module")
def novel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of none of the shapes classes: noise, stripes, a photograph, stars."""
    import skimage.data

    folder = tmp_path_factory.mktemp("novel")
    rng = np.random.default_rng(5)
    for i in range(4):
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / f"noise{i}.png")
        stripes = np.full((64, 64, 3), 255, np.uint8)
        stripes[:, :: 4 + 2 * i] = rng.integers(0, 200, 3)
        Image.fromarray(stripes).save(folder / f"stripes{i}.png")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        photo.resize((96, 96)).save(folder / f"{name}.jpg")
    for i in range(4):  # a drawn shape, but not one of the three
        im = Image.new("RGB", (64, 64), (240, 240, 230))
        d = ImageDraw.Draw(im)
        c = 20 + 6 * i
        star = [(c, 6), (c + 6, 26), (c + 24, 26), (c + 9, 38), (c + 14, 58), (c, 45)]
        star += [(c - 14, 58), (c - 9, 38), (c - 24, 26), (c - 6, 26)]
        d.polygon(star, fill=(30, 30 + 40 * i, 120))
        im.save(folder / f"star{i}.png")
    return folder


def _test_split(run: Path) -> list[Path]:
    config = json.loads((run / "config.json").read_text())
    rows = list(csv.DictReader(open(run / "split.csv", encoding="utf-8")))
    return [Path(config["data_root"]) / r["path"] for r in rows if r["subset"] == "test"]


# ---------------------------------------------------------------------------- the score


def test_balanced_sample_keeps_small_classes_whole_and_caps() -> None:
    labels = [0] * 100 + [1] * 5 + [2] * 50
    rows = balanced_sample(labels, 30, seed=0)
    assert len(rows) == 30 and len(set(rows)) == 30 and list(rows) == sorted(rows)
    counts = np.bincount(np.asarray(labels)[rows], minlength=3)
    assert counts[1] == 5 and abs(int(counts[0]) - int(counts[2])) <= 1
    assert list(balanced_sample(labels, 1000)) == list(range(len(labels)))
    assert list(balanced_sample(labels, 30, seed=1)) != list(rows)  # seeded, not fixed


def test_familiarity_is_the_kth_nearest_cosine_similarity() -> None:
    rng = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(20, 8, generator=rng), dim=1)
    queries = torch.randn(5, 8, generator=rng) * 7  # scale does not matter: cosine
    for k in (1, 3):
        got = Familiarity(bank, k)(queries)
        sims = torch.nn.functional.normalize(queries, dim=1) @ bank.T
        want = sims.sort(dim=1, descending=True).values[:, k - 1]
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(Familiarity(bank, 1)(bank * 3), torch.ones(20), atol=1e-6)
    assert Familiarity(bank, 50).k == 20  # never more neighbours than rows
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 even under autocast
        got = Familiarity(bank, 3)(queries)
    assert got.dtype == torch.float32
    assert torch.allclose(got, Familiarity(bank, 3)(queries), atol=1e-6)


def test_threshold_keeps_the_asked_share_of_the_reference() -> None:
    rng = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 16, generator=rng) * 3
    labels = [i % 3 for i in range(60)]
    train = centres[labels] + torch.randn(60, 16, generator=rng)
    val = centres[labels[:30]] + torch.randn(30, 16, generator=rng)
    shifted = val + 1.5 * torch.randn(30, 16, generator=rng)
    fit = fit_familiarity(train, labels, shifted, 0.9, val, labels[:30], cap=30, k=1)
    assert fit.bank_rows == 30 and fit.module.bank.shape == (30, 16) and fit.module.k == 1
    assert fit.reference_kept >= 0.9  # the 10% quantile, minus a little slack for engines
    assert fit.val_kept >= fit.reference_kept  # clean images are more familiar than shifted
    # validation images scored without their own class look like a new class: mostly rejected
    assert fit.new_class_rejected is not None and fit.new_class_rejected > 0.5
    assert fit.to_dict()["threshold"] == fit.threshold
    one_class = fit_familiarity(train, [0] * 60, val, 0.95, val, [0] * 30)
    assert one_class.new_class_rejected is None  # no other class to stand in for a new one


# ---------------------------------------------------------------------------- a trained run


def test_a_class_never_seen_is_rejected_more_than_the_own_test_images(
    trained_run: Path, novel_dir: Path
) -> None:
    model = load_model(trained_run)
    assert model.familiarity is not None and model.info.familiarity_k >= 1
    assert -1.0 < model.info.familiarity_threshold < 1.0
    summary = json.loads((trained_run / "summary.json").read_text())
    fam = summary["calibration"]["familiarity"]
    assert fam["threshold"] == model.info.familiarity_threshold and fam["bank_rows"] >= 1
    assert fam["reference"] == "validation images under strong augmentation"  # the default
    assert fam["reference_kept"] >= 0.95 and 0 <= fam["new_class_rejected"] <= 1

    predictor = Predictor.from_run(trained_run)
    own = predictor.predict(_test_split(trained_run))
    novel = predictor.predict(sorted(novel_dir.iterdir()))
    own_rejected = np.mean([p.unknown for p in own])
    novel_rejected = np.mean([p.unknown for p in novel])
    assert novel_rejected > own_rejected, (novel_rejected, own_rejected)
    assert novel_rejected >= 0.5  # noise, stripes and photos are far from drawn shapes
    assert all(p.familiarity is not None and -1 <= p.familiarity <= 1 for p in own + novel)
    # the score, not the probability: the novel images get confident-looking answers too
    novel_scores = [p.familiarity for p in novel]
    own_scores = [p.familiarity for p in own]
    assert np.median(novel_scores) < np.median(own_scores)


def test_unknown_off_answers_every_image(
    trained_run: Path, novel_dir: Path, capsys, tmp_path: Path
) -> None:
    paths = [str(p) for p in sorted(novel_dir.iterdir())]
    assert main(["predict", str(trained_run), *paths, "--json"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert "unknown" in [r["label"] for r in on]
    assert all("familiarity" in r for r in on)
    assert {r.get("unknown_reason") for r in on if r["label"] == "unknown"} <= {
        "unfamiliar",
        "unsure",
    }
    assert main(["predict", str(trained_run), *paths, "--json", "--unknown", "off"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in off] == [r["top"][0]["class"] for r in off]
    assert [r["familiarity"] for r in off] == [r["familiarity"] for r in on]

    from graft.api import ImageClassifier

    clf = ImageClassifier.load(trained_run)
    assert clf.predict(paths) == [r["label"] for r in on]
    assert clf.predict(paths, unknown=False) == [r["label"] for r in off]
    with pytest.raises(UsageError, match="True or False"):
        clf.predict(paths, unknown="off")  # a string would be true
    assert np.allclose(clf.familiarity(paths), [r["familiarity"] for r in on], atol=1e-4)
    assert clf.familiarity_threshold_ == load_model(trained_run).info.familiarity_threshold

    # the exported runtime, as a script
    out = tmp_path / "export"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    capsys.readouterr()
    script = out / "graft_runtime.py"
    for flag, want in (([], on), (["--unknown", "off"], off), (["--unknown=off"], off)):
        lines = subprocess.run(
            [sys.executable, str(script), str(out), *flag, *paths],  # options anywhere
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert [line.split(": ", 1)[1].split(" (")[0] for line in lines] == [
            r["label"] for r in want
        ]
        assert all("familiarity" in line for line in lines)
    bad = subprocess.run(
        [sys.executable, str(script), "--unknown", "maybe", str(out), *paths],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--unknown takes on or off" in bad.stderr


def test_serve_answers_unknown_the_same_way_and_can_turn_it_off(
    trained_run: Path, novel_dir: Path
) -> None:
    from fastapi.testclient import TestClient

    from graft.serve import create_app

    paths = sorted(novel_dir.iterdir())
    expected = Predictor.from_run(trained_run).predict(paths)
    files = [("files", (p.name, p.read_bytes())) for p in paths]
    for unknown in (True, False):
        with TestClient(create_app(trained_run, unknown=unknown)) as client:
            answers = client.post("/predict", files=files).json()["predictions"]
            info = client.get("/model").json()
        labels = [a["label"] for a in answers]
        # /model states the model's own threshold either way, and whether it is applied
        assert info["familiarity_threshold"] == load_model(trained_run).info.familiarity_threshold
        if unknown:
            assert labels == [p.label for p in expected] and info["unknown"] == "on"
        else:
            assert "unknown" not in labels and info["unknown"].startswith("off")
        assert np.allclose(
            [a["familiarity"] for a in answers], [p.familiarity for p in expected], atol=1e-4
        )


# ---------------------------------------------------------------------------- off / tampered


def test_a_low_unknown_keep_is_warned_about_and_coverage_reported(tmp_path: Path, capsys):
    data = make_dataset(tmp_path / "data", per_class=8, seed=8)
    args = ["train", str(data), "--out", str(tmp_path / "run"), "--unknown-keep", "0.3"]
    args += ["--img-size", "64", "--epochs", "1", "--fine-tune-epochs", "0", "--workers", "0"]
    args += ["--head-solver", "adam"]  # one epoch: an unsure head, so some answer 'unknown'
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "--unknown-keep 0.3: the threshold keeps only 30%" in err
    assert "With 'unknown':" in err and "of the held-out images answered" in err


def test_unknown_keep_zero_trains_without_the_score(tmp_path: Path, novel_dir: Path) -> None:
    from graft import TrainConfig, fit

    data = make_dataset(tmp_path / "data", per_class=8, seed=4)
    cfg = {**FAST, "epochs": 1, "fine_tune_epochs": 0, "unknown_keep": 0.0}
    fit(TrainConfig(**cfg), data, tmp_path / "run")
    model = load_model(tmp_path / "run")
    assert model.familiarity is None and model.info.familiarity_k == 0
    predictions = Predictor.from_run(tmp_path / "run").predict(sorted(novel_dir.iterdir()))
    assert all(p.familiarity is None and p.top for p in predictions)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["calibration"]["familiarity"] is None


def _tamper(run: Path, tmp_path: Path, how: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    if how == "bank removed":
        del state["familiarity.bank"]
    elif how == "bank of the wrong width":
        state["familiarity.bank"] = state["familiarity.bank"][:, :5].contiguous()
    elif how == "bank without metadata":
        meta["familiarity_k"] = "0"
    elif how == "threshold out of range":
        meta["familiarity_threshold"] = "7"
    elif how == "threshold removed":
        del meta["familiarity_threshold"]
    elif how == "bank scaled":
        state["familiarity.bank"] = state["familiarity.bank"] * 100
    elif how == "more neighbours than rows":
        meta["familiarity_k"] = str(len(state["familiarity.bank"]) + 1)
    else:  # NaN in the bank
        state["familiarity.bank"][0, 0] = float("nan")
    save_file(state, str(path), metadata=meta)
    return copy


@pytest.mark.parametrize(
    "how, words",
    [
        ("bank removed", "familiarity score but no bank"),
        ("bank of the wrong width", "familiarity bank has shape"),
        ("bank without metadata", "no familiarity_k"),
        ("threshold out of range", "familiarity_threshold=7"),
        ("threshold removed", "no familiarity_threshold"),
        ("bank scaled", "not unit vectors"),
        ("more neighbours than rows", "but its bank holds only"),
        ("NaN in the bank", "familiarity.bank"),
    ],
)
def test_a_tampered_score_is_refused(trained_run: Path, tmp_path: Path, how: str, words: str):
    copy = _tamper(trained_run, tmp_path, how)
    with pytest.raises(WeightsError, match="familiarity") as err:
        load_model(copy)
    assert words in str(err.value)


@pytest.mark.parametrize("reference", ["unseen", "validation"])
def test_the_threshold_reference_is_the_unseen_images_else_the_one_asked(
    tmp_path: Path, unseen_dir: Path, reference: str
) -> None:
    from graft import TrainConfig, fit

    data = make_dataset(tmp_path / "data", per_class=8, seed=6)
    cfg = {**FAST, "epochs": 1, "fine_tune_epochs": 0, "unknown_reference": "validation"}
    if reference == "unseen":
        cfg["unseen"] = str(unseen_dir)
    fit(TrainConfig(**cfg), data, tmp_path / "run")
    fam = json.loads((tmp_path / "run" / "summary.json").read_text())["calibration"]["familiarity"]
    if reference == "unseen":  # the real change of source wins over any stand-in
        assert fam["reference"] == "the 9 --unseen images"
        assert fam["unseen_kept"] == fam["reference_kept"] >= 0.95
    else:
        assert fam["reference"] == "validation images" and fam["unseen_kept"] is None
        assert fam["validation_kept"] == fam["reference_kept"] >= 0.95


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--unknown-reference", "photos", "invalid choice"),
        ("--unknown-keep", "1.5", "--unknown-keep 1.5 is not valid"),
        ("--unknown-keep", "nan", "--unknown-keep nan is not valid"),
    ],
)
def test_bad_unknown_options_are_refused_before_anything_is_written(
    tmp_path: Path, shapes_dir: Path, capsys, option: str, value: str, words: str
) -> None:
    out = tmp_path / "run"
    try:
        code = main(["train", str(shapes_dir), "--out", str(out), option, value])
    except SystemExit as exc:  # argparse's own refusal of a choice
        code = exc.code
    assert code == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_a_csv_from_before_the_familiarity_column_is_refused_not_mixed(
    trained_run: Path, novel_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "old.csv"
    old = "path,label,error,class_1,probability_1\n/x.png,circle,,circle,0.9\n"
    out.write_text(old)
    paths = [str(p) for p in sorted(novel_dir.iterdir())[:2]]
    assert main(["predict", str(trained_run), *paths, "--out", str(out), "--top-k", "1"]) == 2
    assert "before the familiarity column" in capsys.readouterr().err
    assert out.read_text() == old  # left as it was


def test_tta_keeps_the_familiarity_of_the_image_itself(trained_run: Path, novel_dir: Path):
    """Flipped and cropped views are less familiar; the threshold was set on single images,
    so TTA must not turn in-class images "unknown" by averaging them in."""
    paths = _test_split(trained_run)[:4] + sorted(novel_dir.iterdir())[:4]
    plain = Predictor.from_run(trained_run).predict_scores(paths)[1]
    tta = Predictor.from_run(trained_run, tta=True).predict_scores(paths)[1]
    assert plain is not None and tta is not None
    assert np.allclose(plain, tta, atol=1e-5)


def test_the_export_names_its_extra_column(trained_run: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from graft.export import export_run

    out = export_run(trained_run, "onnx", tmp_path / "export")
    meta = json.loads((out / "graft.json").read_text())
    names = [o.name for o in ort.InferenceSession(str(out / "model.onnx")).get_outputs()]
    assert names == [meta["output"]["name"]] == ["probabilities_and_familiarity"]
    assert meta["output"]["shape"] == ["batch", 4] and meta["graft_export"] == 2


@pytest.mark.parametrize(
    "how", ["familiarity not an object", "familiarity removed", "a class removed"]
)
def test_a_damaged_export_description_is_refused_at_load(
    trained_run: Path, tmp_path: Path, how: str
) -> None:
    from graft.export import export_run
    from graft.runtime import ExportedModel, ExportError
    from graft.runtime import main as runtime_main

    out = export_run(trained_run, "onnx", tmp_path / "export")
    meta = json.loads((out / "graft.json").read_text())
    if how == "familiarity not an object":
        meta["familiarity"] = "yes"
    elif how == "familiarity removed":  # the model still has the column
        meta["familiarity"] = None
    else:
        meta["classes"] = meta["classes"][:-1]
    (out / "graft.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"graft\.json"):
        ExportedModel(out)
    assert runtime_main([str(out), str(out / "graft.json")]) == 6


def test_familiarity_is_a_cosine_in_minus_one_to_one() -> None:
    """A training image's match with itself is 1, never 1.0000001 (float rounding of the
    normalised dot product), so printed and compared familiarities stay in [-1, 1]."""
    bank = torch.nn.functional.normalize(
        torch.randn(300, 1280, generator=torch.Generator().manual_seed(0)), dim=1
    )
    score = Familiarity(bank, k=1)(bank * 3.7)
    assert float(score.max()) <= 1.0 and float(score.min()) >= 0.999
    assert float(Familiarity(bank, k=1)(-bank).min()) >= -1.0
