"""The fast paths must give the same numbers as the plain ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, draw_shape
from graft import TrainConfig, fit
from graft.backbones import create_backbone
from graft.data import ImageFiles, build_transform, scan
from graft.engines import ONNX_ATOL, FrozenPart, OnnxRunner, TorchRunner, make_runner
from graft.predict import Predictor
from graft.train import choose_engine


def test_onnx_prediction_matches_pytorch(trained_run: Path, unseen_dir: Path) -> None:
    files = sorted(unseen_dir.rglob("*.png")) + sorted(unseen_dir.rglob("*.jpg"))
    fast = Predictor.from_run(trained_run)
    plain = Predictor.from_run(trained_run, backend="torch")
    assert isinstance(fast.runner, OnnxRunner) and isinstance(plain.runner, TorchRunner)
    assert (trained_run / "model.onnx").is_file()
    a, _ = fast.predict_proba(files)
    b, _ = plain.predict_proba(files)
    assert np.abs(a - b).max() < ONNX_ATOL
    assert (a.argmax(1) == b.argmax(1)).all()


def test_onnx_frozen_features_match_pytorch(shapes_dir: Path) -> None:
    backbone, _ = create_backbone("efficientnet_lite0")
    engine = choose_engine()
    data = scan(shapes_dir)
    files = ImageFiles(data.paths[:12], None, build_transform(64, (0.5,) * 3, (0.5,) * 3), 64)
    x = torch.stack([files[i][0] for i in range(12)])
    for cut in (7, 9):  # activations at a cut, and pooled features
        part = FrozenPart(backbone, cut)
        onnx = make_runner(part, 64, engine)
        assert isinstance(onnx, OnnxRunner)
        diff = (onnx(x) - TorchRunner(part, engine)(x)).abs().max().item()
        assert diff < ONNX_ATOL, (cut, diff)


def test_pytorch_fallback_when_onnx_is_switched_off(trained_run: Path, monkeypatch) -> None:
    monkeypatch.setenv("GRAFT_ENGINE", "torch")
    assert isinstance(Predictor.from_run(trained_run).runner, TorchRunner)


def test_second_run_reuses_the_feature_cache_and_matches(
    tmp_path: Path, shapes_dir: Path, monkeypatch
) -> None:
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(**{**FAST, "epochs": 3, "fine_tune_epochs": 2})
    first = fit(cfg, shapes_dir, tmp_path / "a")
    second = fit(cfg, shapes_dir, tmp_path / "b")
    t1, t2 = first.summary["timings"], second.summary["timings"]
    assert t1["cache_hits"] == 0 and t1["cache_misses"] > 0
    assert t2["cache_misses"] == 0 and t2["cache_hits"] == t1["cache_misses"]
    assert [(r.train_loss, r.val_loss) for r in first.history] == [
        (r.train_loss, r.val_loss) for r in second.history
    ]
    # the cache says what it holds
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["img_size"] == 64


def test_new_images_are_the_only_ones_computed(
    tmp_path: Path, shapes_dir: Path, monkeypatch
) -> None:
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    cfg = TrainConfig(**{**FAST, "epochs": 1, "fine_tune_epochs": 0, "augment": "none"})
    fit(cfg, data, tmp_path / "a")
    import random

    for i in range(3):  # new files, and one existing file edited
        draw_shape("circle", random.Random(1000 + i)).save(data / "circle" / f"new{i}.png")
    edited = sorted((data / "square").glob("*.png"))[0]
    draw_shape("square", random.Random(77)).save(edited)
    result = fit(cfg, data, tmp_path / "b")
    t = result.summary["timings"]
    # train+val images only: the 3 new ones and the edited one can land in test instead
    assert 0 < t["cache_misses"] <= 4 and t["cache_hits"] >= 30


def test_augmented_view_does_not_depend_on_batch_or_order(shapes_dir: Path) -> None:
    from graft.cache import item_seed

    data = scan(shapes_dir)
    tf = build_transform(64, (0.5,) * 3, (0.5,) * 3, "strong")
    seeds = [item_seed(h, 1, 42) for h in data.sha256[:6]]
    files = ImageFiles(data.paths[:6], None, tf, 64, seeds)
    forward = [files[i][0] for i in range(6)]
    backward = [files[i][0] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert torch.equal(files.subset([3])[0][0], forward[3])


def test_cache_writes_chunks_as_it_goes_and_keeps_them_after_a_crash(tmp_path: Path) -> None:
    from graft.cache import FeatureCache

    shas = [f"{i:064x}" for i in range(10)]
    truth = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    calls: list[list[int]] = []

    def compute(idx: list[int]) -> torch.Tensor:
        calls.append(idx)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the pass is interrupted in its third chunk
        return truth[idx]

    cache = FeatureCache(tmp_path, {"backbone": "x"})
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute("clean", shas, compute, chunk=3)
    assert len(list((cache.folder / "view-clean").glob("*.safetensors"))) == 2  # 6 kept

    calls.clear()
    again = FeatureCache(tmp_path, {"backbone": "x"})
    order = shas[::-1]  # any order, duplicates allowed
    got = again.get_or_compute("clean", [*order, shas[0]], lambda i: truth.flip(0)[i], chunk=3)
    assert again.hits == 7 and again.misses == 4  # the 6 stored (+1 duplicate); 4 new
    assert torch.equal(got[:10], truth.flip(0)) and torch.equal(got[10], truth[0])
    third = FeatureCache(tmp_path, {"backbone": "x"})
    assert torch.equal(third.get_or_compute("clean", shas, compute, chunk=3), truth)
    assert third.misses == 0
