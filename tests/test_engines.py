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
from graft.data import ImageFiles, build_transform, scan
from graft.device import choose_device
from graft.engines import (
    ONNX_ATOL,
    OnnxRunner,
    OpenVinoRunner,
    TorchRunner,
    export_onnx,
    make_runner,
)
from graft.model import FrozenPart, create_backbone
from graft.predict import Predictor


@pytest.fixture(autouse=True)
def fp32_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engines run fp32; so must the PyTorch they are compared with, also on a CPU with
    native bf16, where graft would otherwise pick bf16 autocast."""
    monkeypatch.setenv("GRAFT_PRECISION", "fp32")


@pytest.mark.parametrize(("wanted", "kind"), [("", OpenVinoRunner), ("onnxruntime", OnnxRunner)])
def test_fast_prediction_matches_pytorch(
    trained_run: Path, unseen_dir: Path, monkeypatch, wanted: str, kind: type
) -> None:
    monkeypatch.setenv("GRAFT_ENGINE", wanted)
    files = sorted(unseen_dir.rglob("*.png")) + sorted(unseen_dir.rglob("*.jpg"))
    fast = Predictor.from_run(trained_run)
    plain = Predictor.from_run(trained_run, backend="torch")
    assert isinstance(fast.runner, kind) and isinstance(plain.runner, TorchRunner)
    assert (trained_run / "model.onnx").is_file()
    a, _ = fast.predict_proba(files)
    b, _ = plain.predict_proba(files)
    assert np.abs(a - b).max() < ONNX_ATOL
    assert (a.argmax(1) == b.argmax(1)).all()


def test_fast_frozen_features_match_pytorch(shapes_dir: Path, monkeypatch) -> None:
    backbone, _ = create_backbone("efficientnet_lite0")
    engine = choose_device()
    data = scan(shapes_dir)
    files = ImageFiles(data.paths[:12], None, build_transform(64, (0.5,) * 3, (0.5,) * 3), 64)
    x = torch.stack([files[i][0] for i in range(12)])
    for wanted, kind in (("openvino", OpenVinoRunner), ("onnxruntime", OnnxRunner)):
        monkeypatch.setenv("GRAFT_ENGINE", wanted)
        for cut in (7, 9):  # activations at a cut, and pooled features
            part = FrozenPart(backbone, cut)
            fast = make_runner(part, 64, engine)
            assert isinstance(fast, kind)
            diff = (fast(x) - TorchRunner(part, engine)(x)).abs().max().item()
            assert diff < ONNX_ATOL, (wanted, cut, diff)


def test_a_small_job_runs_on_pytorch_and_a_large_one_on_the_fast_engine(
    shapes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporting and compiling the frozen part costs about a second: a job too small to
    win it back runs eagerly; the choice goes by the job's size alone (a resumed run makes
    it as the uninterrupted one did), and GRAFT_ENGINE, when set, decides every job."""
    from graft.backbones import get_spec
    from graft.features import FAST_ENGINE_MIN_IMAGES, FrozenFeatures
    from graft.model import ModelInfo, build_model

    monkeypatch.delenv("GRAFT_ENGINE", raising=False)
    data = scan(shapes_dir)
    spec = get_spec("efficientnet_lite0")
    info = ModelInfo("efficientnet_lite0", 64, spec.mean, spec.std, tuple(data.classes))
    model, source = build_model(info, True, None, False)
    frozen = FrozenFeatures(model, source)
    # at 64 px an image is a quarter of the work of one at 128 px
    small, large = 4 * FAST_ENGINE_MIN_IMAGES - 1, 4 * FAST_ENGINE_MIN_IMAGES
    assert isinstance(frozen.runner_for(small), TorchRunner)
    assert frozen.engines_used == [frozen.runner_for(small).name]
    assert isinstance(frozen.runner_for(large), OpenVinoRunner)
    assert isinstance(frozen.runner_for(small), TorchRunner)  # by size, not by history
    assert len(frozen.engines_used) == 2
    monkeypatch.setenv("GRAFT_ENGINE", "openvino")
    assert isinstance(frozen.runner_for(1), OpenVinoRunner)
    monkeypatch.setenv("GRAFT_ENGINE", "torch")
    fresh = FrozenFeatures(model, source)
    assert isinstance(fresh.runner_for(10 * large), TorchRunner)
    # the two engines give the same features
    files = ImageFiles(data.paths[:8], None, build_transform(64, spec.mean, spec.std), 64)
    x = torch.stack([files[i][0] for i in range(8)])
    diff = (frozen.runner_for(large)(x) - frozen.runner_for(small)(x)).abs().max().item()
    assert diff < ONNX_ATOL


def test_openvino_pads_ragged_batches_to_static_shapes(tmp_path: Path) -> None:
    backbone, _ = create_backbone("efficientnet_lite0")
    part = FrozenPart(backbone, 9).eval()
    path = export_onnx(part, 64, tmp_path / "part.onnx")
    runner = OpenVinoRunner(path, max_batch=8)
    x = torch.randn(13, 3, 64, 64)
    with torch.no_grad():
        want = part(x)
    # 13 > max_batch: 8 + 5 (padded to 8); then 3 (padded to 4) and 1 alone
    assert (runner(x) - want).abs().max().item() < ONNX_ATOL
    assert (runner(x[:3]) - want[:3]).abs().max().item() < ONNX_ATOL
    assert (runner(x[:1]) - want[:1]).abs().max().item() < ONNX_ATOL
    assert sorted(runner.requests) == [1, 4, 8]


def test_pytorch_fallback_when_fast_engines_are_switched_off(
    trained_run: Path, monkeypatch
) -> None:
    monkeypatch.setenv("GRAFT_ENGINE", "torch")
    assert isinstance(Predictor.from_run(trained_run).runner, TorchRunner)


def test_a_failing_engine_falls_back_to_the_next_with_a_note(
    trained_run: Path, monkeypatch
) -> None:
    import graft.engines

    def broken(*args, **kwargs):
        raise RuntimeError("simulated: no CPU plugin")

    monkeypatch.setattr(graft.engines, "OpenVinoRunner", broken)
    predictor = Predictor.from_run(trained_run)
    assert isinstance(predictor.runner, OnnxRunner)
    assert any("openvino could not load" in n and "simulated" in n for n in predictor.notes)


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


def test_openvino_warm_up_compiles_the_shapes_a_server_will_use(tmp_path: Path) -> None:
    backbone, _ = create_backbone("efficientnet_lite0")
    path = export_onnx(FrozenPart(backbone, 9).eval(), 64, tmp_path / "part.onnx")
    runner = OpenVinoRunner(path, max_batch=64)
    runner.warm_up(20)  # batches of up to 20 are padded to at most 32
    assert sorted(runner.requests) == [1, 2, 4, 8, 16, 32]
