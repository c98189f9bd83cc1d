"""Predicting from a run's current ONNX export without torch (graft.fast): the same answers as
the PyTorch path, torch never imported, and a stale or mismatched export rebuilt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset
from graft.fast import OPENVINO_FROM_IMAGES, ExportPredictor, open_predictor
from graft.inference import OnnxEngine, OpenVinoEngine
from graft.modelinfo import current_onnx
from graft.predict import Predictor


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = make_dataset(tmp_path_factory.mktemp("fast") / "imgs", per_class=3, seed=7)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    broken = root / "broken.jpg"
    broken.write_bytes(files[0].read_bytes()[:100] if files[0].suffix == ".jpg" else b"\xff\xd8")
    return [*files, broken, root / "missing.png"]


@pytest.fixture()
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the trained run that a test may damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _script(run: Path, paths: list[Path], n_images: int | None) -> str:
    return (
        "import json, sys\n"
        "from graft.fast import open_predictor\n"
        f"p = open_predictor({str(run)!r}, n_images={n_images!r})\n"
        f"probs, fam, failed = p.predict_scores({[str(x) for x in paths]!r}, batch_size=4)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'kind': type(p).__name__,\n"
        "    'engine': p.runner.name, 'probs': probs.tolist(),\n"
        "    'fam': None if fam is None else fam.tolist(), 'failed': failed}))\n"
    )


@pytest.mark.parametrize("n_images", [1, None])  # ONNX Runtime (small job), OpenVINO (server)
def test_without_torch_the_same_probabilities_as_pytorch(
    trained_run: Path, images: list[Path], n_images: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAFT_PRECISION", "fp32")
    assert current_onnx(trained_run / "model.safetensors") is not None  # training left it
    out = subprocess.run(
        [sys.executable, "-c", _script(trained_run, images, n_images)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GRAFT_PRECISION": "fp32"},
    )
    got = json.loads(out.stdout)
    assert got["torch"] is False, "graft.fast imported torch"
    assert got["kind"] == "ExportPredictor"
    assert ("ONNX Runtime" if n_images == 1 else "OpenVINO") in got["engine"]
    want_probs, want_fam, want_failed = Predictor.from_run(
        trained_run, backend="torch"
    ).predict_scores(images, batch_size=4)
    probs = np.array(got["probs"], dtype=np.float64)
    ok = ~np.isnan(want_probs).any(axis=1)
    assert ok.sum() == len(images) - 2  # the broken and the missing file
    assert np.isnan(probs[~ok]).all()
    assert np.abs(probs[ok] - want_probs[ok]).max() < 1e-4
    assert want_fam is not None and got["fam"] is not None
    assert np.abs(np.array(got["fam"])[ok] - want_fam[ok]).max() < 1e-4
    # the same per-file reasons as the PyTorch path
    assert {int(k): v for k, v in got["failed"].items()} == want_failed


def test_cli_predict_never_imports_torch_and_answers_like_the_library(
    trained_run: Path, images: list[Path]
) -> None:
    cmd = [sys.executable, "-X", "importtime", "-m", "graft.cli", "predict", str(trained_run)]
    out = subprocess.run(
        [*cmd, *map(str, images[:4]), "--json"], capture_output=True, text=True, check=True
    )
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "timm" not in imported
    answers = json.loads(out.stdout)
    want = Predictor.from_run(trained_run, backend="torch").predict(images[:4])
    assert [a["label"] for a in answers] == [p.label for p in want]
    for a, p in zip(answers, want, strict=True):
        assert abs(a["top"][0]["probability"] - p.top[0][1]) < 1e-4


def test_decoding_threads_keep_the_order(trained_run: Path, images: list[Path]) -> None:
    alone = open_predictor(trained_run, workers=0, n_images=1)
    threaded = open_predictor(trained_run, workers=2, n_images=1)
    assert isinstance(threaded, ExportPredictor)
    a = alone.predict(images, batch_size=2)
    b = threaded.predict(images, batch_size=2)
    assert [p.path for p in b] == [str(p) for p in images]
    assert [(p.label, p.error) for p in a] == [(p.label, p.error) for p in b]


def test_the_engine_follows_the_job_and_graft_engine(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def engine(n: int | None) -> object:
        p = open_predictor(trained_run, n_images=n)
        return p.engine if isinstance(p, ExportPredictor) else p

    monkeypatch.delenv("GRAFT_ENGINE", raising=False)
    assert isinstance(engine(5), OnnxEngine)
    assert isinstance(engine(OPENVINO_FROM_IMAGES), OpenVinoEngine)
    assert isinstance(engine(None), OpenVinoEngine)
    monkeypatch.setenv("GRAFT_ENGINE", "openvino")
    assert isinstance(engine(5), OpenVinoEngine)
    monkeypatch.setenv("GRAFT_ENGINE", "onnxruntime")
    assert isinstance(engine(None), OnnxEngine)
    monkeypatch.setenv("GRAFT_ENGINE", "torch")
    assert isinstance(engine(5), Predictor)
    assert isinstance(open_predictor(trained_run, tta=True, n_images=5), Predictor)  # TTA: torch


def test_a_stale_export_is_rebuilt_by_the_pytorch_path(run_copy: Path) -> None:
    weights = run_copy / "model.safetensors"
    stamp = run_copy / "model.onnx.json"
    stamp.write_text(json.dumps({"weights_sha256": "0" * 64}))  # made from other weights
    assert current_onnx(weights) is None
    assert isinstance(open_predictor(run_copy, n_images=1), Predictor)  # rebuilds it
    assert current_onnx(weights) is not None
    assert isinstance(open_predictor(run_copy, n_images=1), ExportPredictor)
    (run_copy / "model.onnx").unlink()  # gone: rebuilt the same way
    assert isinstance(open_predictor(run_copy, n_images=1), Predictor)
    assert current_onnx(weights) is not None


def test_a_graph_that_does_not_fit_its_weights_is_replaced(
    run_copy: Path, tmp_path: Path, images: list[Path]
) -> None:
    """A model.onnx from another run (two classes) with a forged stamp: its output has the
    wrong width, so it is removed and made again from the weights."""
    import torch

    from graft.engines import export_onnx

    other = tmp_path / "other.onnx"
    export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 2)), 64, other)
    shutil.copy(other, run_copy / "model.onnx")
    predictor = open_predictor(run_copy, n_images=1)
    assert isinstance(predictor, Predictor)
    assert len(predictor.predict(images[:1])[0].top) == 3
    assert isinstance(open_predictor(run_copy, n_images=1), ExportPredictor)


def test_serving_a_run_with_a_current_export_never_imports_torch(
    trained_run: Path, images: list[Path]
) -> None:
    code = (
        "import sys, json\n"
        "from graft.serve import ServedModel\n"
        f"m = ServedModel({str(trained_run)!r})\n"
        "m.warm_up(2)\n"
        f"raw = open({str(images[0])!r}, 'rb').read()\n"
        "probs, fam = m.split(m.infer([m.prepare(raw), m.prepare(raw)]))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'engine': m.engine,\n"
        "    'p': probs[0].tolist()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["torch"] is False and "OpenVINO" in got["engine"]
    want, _, _ = Predictor.from_run(trained_run, backend="torch").predict_scores(images[:1])
    assert np.abs(np.array(got["p"]) - want[0]).max() < 1e-4


def test_a_graph_swapped_in_from_a_run_with_the_same_classes_is_not_trusted(
    run_copy: Path, tmp_path: Path, images: list[Path]
) -> None:
    """Same output width, other weights: only the graph's own hash in model.onnx.json tells."""
    import torch

    from graft.engines import Probabilities, export_onnx
    from graft.model import load_model

    model = load_model(run_copy)
    with torch.no_grad():
        for weight in model.head.parameters():  # another model, the same classes and shapes
            weight.mul_(-1)
    export_onnx(Probabilities(model), 64, run_copy / "model.onnx")
    assert current_onnx(run_copy / "model.safetensors") is None
    got = open_predictor(run_copy, n_images=1)  # rebuilt from the weights
    want = Predictor.from_run(run_copy, backend="torch").predict_scores(images[:3])[0]
    assert np.abs(got.predict_scores(images[:3])[0] - want).max() < 1e-4
    assert isinstance(open_predictor(run_copy, n_images=1), ExportPredictor)


def test_a_damaged_graph_is_rebuilt_not_paid_for_on_every_call(run_copy: Path) -> None:
    (run_copy / "model.onnx").write_bytes(b"\x08\x07garbage" * 1000)
    stamp = json.loads((run_copy / "model.onnx.json").read_text())
    stamp["onnx_sha256"] = (
        __import__("hashlib").sha256((run_copy / "model.onnx").read_bytes()).hexdigest()
    )
    (run_copy / "model.onnx.json").write_text(json.dumps(stamp))  # a stamp that matches it
    assert isinstance(open_predictor(run_copy, n_images=1), Predictor)
    assert isinstance(open_predictor(run_copy, n_images=1), ExportPredictor)
