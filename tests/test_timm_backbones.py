"""Any timm model as a backbone (graft.timm_backbones): real tiny timm models from three
families (ResNet, ConvNeXt, ViT), with weights each test writes itself and loads through
--weights, trained through both stages, predicted, exported with parity and resumed; the
hub download path (mocked, never the network) and --offline."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from conftest import make_dataset
from graft.backbones import available_backbones, backbone_problem, get_spec
from graft.cli import main
from graft.errors import UsageError, WeightsError
from graft.export import EXPORT_ATOL, FORMATS, export_run
from graft.model import create_backbone, load_model
from graft.modelinfo import ModelInfo
from graft.predict import Predictor

#: one tiny model per family, and how many blocks graft makes of it (timm's coarse groups)
FAMILIES = {
    "resnet10t": 5,  # stem, layer1..4
    "convnext_atto": 5,  # stem, 4 stages
    "vit_tiny_patch16_224": 13,  # embedding, 12 transformer blocks (the last with the norm)
}
SIZE = 64
TRAIN = [
    "--img-size", str(SIZE), "--epochs", "1", "--fine-tune-epochs", "2", "--unfreeze", "2",
    "--views", "1", "--patience", "0", "--workers", "0", "--unknown-keep", "0", "--quiet",
]  # fmt: skip


def write_weights(name: str, folder: Path, pth: bool = False) -> Path:
    """A state dict of the full timm model (classifier included, a ViT at its own 224 px,
    so graft must resample its position embedding), random but fixed."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}
    if pth:  # a plain PyTorch state dict, the other format --weights takes
        path = folder / f"{name}.pth"
        torch.save(state, path)
    else:
        path = folder / f"{name}.safetensors"
        save_file(state, str(path))
    return path


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("name", [*FAMILIES, "mobilenetv3_small_050", "eva02_tiny_patch14_224"])
def test_blocks_reproduce_forward_features_and_pool_like_timm(name: str) -> None:
    backbone, source = create_backbone(name, pretrained=False, img_size=SIZE)
    assert source == "random" and backbone.model is not None
    timm_model = backbone.model.eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = timm_model.forward_features(x)
        assert torch.allclose(backbone.eval().forward_maps(x), want, atol=1e-6)
        pooled = timm_model.forward_head(want, pre_logits=True)
        assert torch.allclose(backbone(x), pooled, atol=1e-6)
    assert pooled.shape == (2, backbone.num_features)
    if name in FAMILIES:
        assert len(backbone.blocks) == FAMILIES[name] and backbone.sequential
    if name == "eva02_tiny_patch14_224":  # rotary embeddings: forward_features taken whole
        assert len(backbone.blocks) == 1 and not backbone.sequential
    # the weights keep timm's names, each once (the blocks are views, not copies)
    names = list(backbone.state_dict())
    assert names == [f"model.{k}" for k in timm_model.state_dict()]


def test_unfreeze_follows_timm_groups_and_includes_the_pooling_norm() -> None:
    from graft.model import build_model

    info = ModelInfo("convnext_atto", SIZE, (0.5,) * 3, (0.5,) * 3, ("a", "b"))
    model, _ = build_model(info, pretrained=False)
    assert model.unfreeze(2) == 2
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = {".".join(n.split(".")[:4]) for n in learning}
    assert prefixes == {
        "backbone.model.stages.2",
        "backbone.model.stages.3",
        "backbone.model.head.norm",  # ConvNeXt's norm after pooling
        "head.1.weight",
        "head.1.bias",
    }
    info = ModelInfo("vit_tiny_patch16_224", SIZE, (0.5,) * 3, (0.5,) * 3, ("a", "b"))
    vit, _ = build_model(info, pretrained=False)
    vit.unfreeze(1)  # timm groups the final norm with the last transformer block
    learning = {n for n, p in vit.backbone.named_parameters() if p.requires_grad}
    assert {".".join(n.split(".")[1:3]) for n in learning} == {
        "blocks.11",
        "norm.weight",
        "norm.bias",
    }


def test_a_model_that_cannot_run_at_the_size_says_which_size_to_use() -> None:
    with pytest.raises(UsageError, match=r"cannot run on 64x64 images.*--img-size 240"):
        create_backbone("crossvit_tiny_240", pretrained=False, img_size=SIZE)


# --------------------------------------------------------------------------- names


def test_names_timm_knows_and_close_matches_for_the_rest() -> None:
    for name in ("convnext_tiny.fb_in22k", "resnet50.a1_in1k", "efficientnetv2_rw_s", "auto"):
        assert backbone_problem(name, auto=True) == ""
    assert "resnet18" in backbone_problem("resnet_18")
    assert "convnext_tiny.fb_in22k" in backbone_problem("convnext_tiny.fb_in22")
    assert "not a backbone name" in backbone_problem("hf-hub:timm/resnet50")
    spec = get_spec("vit_small_patch14_dinov2.lvd142m")  # preprocessing from timm's config
    assert spec.mean == (0.485, 0.456, 0.406) and spec.native_img_size == 518
    assert spec.interpolation == "bicubic"
    assert get_spec("efficientnet_lite0").timm_name == "tf_efficientnet_lite0"  # built in


def test_model_metadata_accepts_timm_names_without_asking_timm() -> None:
    meta = ModelInfo("convnext_tiny.fb_in22k", 64, (0.5,) * 3, (0.5,) * 3, ("a", "b"))
    assert ModelInfo.from_metadata(meta.to_metadata()).backbone == "convnext_tiny.fb_in22k"
    bad = {**meta.to_metadata(), "backbone": json.dumps("../../etc/passwd")}
    with pytest.raises(WeightsError, match="timm model name expected"):
        ModelInfo.from_metadata(bad)


# --------------------------------------------------------------------------- weights


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hugging Face and torch hub caches that hold nothing (or what the test puts there)."""
    from huggingface_hub import constants

    hf = tmp_path / "hf-cache"
    hf.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return hf


def test_download_online_refused_offline_and_read_from_the_cache(
    tmp_path: Path, empty_caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm's hub call is mocked (the model and timm's loading are real): taken when
    downloads are allowed, never under --offline, and not needed once the file is cached."""
    import timm.models._hub as hub

    weights = write_weights("resnet10t", tmp_path)
    calls: list[str] = []

    def fake_download(*args: object, **kwargs: object) -> str:
        calls.append(str(kwargs.get("repo_id") or args[0]))
        return str(weights)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    with pytest.raises(WeightsError, match=r"--offline.*--weights FILE.*--no-pretrained"):
        create_backbone("resnet10t", allow_download=False, img_size=SIZE)
    assert calls == []
    backbone, source = create_backbone("resnet10t", allow_download=True, img_size=SIZE)
    assert calls == ["timm/resnet10t.c3_in1k"] and source == "hf-hub:timm/resnet10t.c3_in1k"
    assert torch.equal(backbone.model.conv1[0].weight, load_file(str(weights))["conv1.0.weight"])

    # once in the Hugging Face cache, --offline reads it from there
    snapshot = empty_caches / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(weights.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    _, source = create_backbone("resnet10t", allow_download=False, img_size=SIZE)
    assert source == "hf-hub:timm/resnet10t.c3_in1k" and len(calls) == 1
    assert "resnet10t.c3_in1k" in available_backbones()  # --backbone auto probes it


def test_offline_train_without_weights_leaves_nothing(
    tmp_path: Path, empty_caches: Path, shapes_dir: Path, capsys
) -> None:
    out = tmp_path / "run"
    code = main(["train", str(shapes_dir), "--out", str(out), "--backbone", "convnext_atto",
                 "--offline", *TRAIN])  # fmt: skip
    assert code == 4 and not out.exists()
    assert "downloads are off (--offline)" in capsys.readouterr().err


def test_wrong_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    weights = write_weights("resnet10t", tmp_path)
    with pytest.raises(WeightsError, match="do not fit convnext_atto"):
        create_backbone("convnext_atto", weights=weights, img_size=SIZE)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images per class: enough for a split, few enough for six runs."""
    return make_dataset(tmp_path_factory.mktemp("small") / "shapes", per_class=8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, small_shapes: Path) -> dict[str, Path]:
    """One uninterrupted run per family, --weights written by the test (ConvNeXt's as a
    plain .pth state dict)."""
    folder = tmp_path_factory.mktemp("timm-runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAFT_PRECISION", "fp32")
        for name in FAMILIES:
            weights = write_weights(name, folder, pth=name == "convnext_atto")
            run = folder / name
            args = ["train", str(small_shapes), "--out", str(run), "--backbone", name]
            assert main([*args, "--weights", str(weights), *TRAIN]) == 0
            out[name] = run
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_trains_both_stages_and_predicts(
    name: str, runs: dict[str, Path], unseen_dir: Path, tmp_path: Path, capsys
) -> None:
    run = runs[name]
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == name and config["weights_source"].endswith(config["weights"])
    assert f"last 2/{FAMILIES[name]} blocks" in config["plan"]
    assert "cached activations at the cut" in config["plan"]
    rows = list(csv.DictReader(open(run / "history.csv")))
    stages = [r["stage"] for r in rows]  # the probe's L2 path, then two epochs
    assert stages[0] == "frozen" and stages[-2:] == ["fine-tune"] * 2
    assert stages.count("fine-tune") == 2
    model = load_model(run)
    assert model.info.backbone == name and model.info.mean == get_spec(name).mean

    images = sorted(unseen_dir.rglob("*.png"))[:4]
    reference = Predictor.from_run(run, backend="torch", unknown=False)
    probs, _, failed = reference.predict_scores(images)
    assert not failed
    out = tmp_path / "preds.csv"
    code = main(["predict", str(run), *map(str, images), "--out", str(out), "--unknown", "off"])
    assert code == 0
    predicted = list(csv.DictReader(open(out)))
    assert [r["label"] for r in predicted] == [reference.classes[i] for i in probs.argmax(1)]
    top = np.array([float(r["probability_1"]) for r in predicted])
    assert np.abs(top - probs.max(1)).max() <= 1e-4


def _runtime(folder: Path) -> Any:  # the export folder's own module
    spec = importlib.util.spec_from_file_location(f"rt_{folder.name}", folder / "graft_runtime.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", FAMILIES)
def test_every_export_format_matches_predict(
    name: str, runs: dict[str, Path], unseen_dir: Path, tmp_path: Path
) -> None:
    images = sorted(unseen_dir.rglob("*.*"))
    expected, _, failed = Predictor.from_run(runs[name], backend="torch").predict_scores(images)
    assert not failed
    for fmt in FORMATS:
        folder = export_run(runs[name], fmt, tmp_path / f"export-{fmt}")
        got = _runtime(folder).ExportedModel(folder).predict_proba(images)
        diff = np.abs(np.asarray(got) - expected).max()
        assert diff <= EXPORT_ATOL[fmt], f"{name} {fmt}: max probability difference {diff:.2e}"


@pytest.mark.parametrize("name", FAMILIES)
def test_interrupted_run_resumes_to_the_same_result(
    name: str, runs: dict[str, Path], small_shapes: Path, tmp_path: Path, monkeypatch
) -> None:
    """Interrupted after the first fine-tuning epoch (its checkpoint written), then
    `graft train --resume` with the run's own config (its --weights file included)."""
    import graft.stages

    monkeypatch.setenv("GRAFT_PRECISION", "fp32")
    saved = graft.stages.save_checkpoint

    def save_then_stop(path, model, optimizer, generators, rng, meta, best, *rest):
        saved(path, model, optimizer, generators, rng, meta, best, *rest)
        if meta["stage"] == "fine-tune":
            raise KeyboardInterrupt

    whole = runs[name]
    config = json.loads((whole / "config.json").read_text())
    run = tmp_path / "interrupted"
    monkeypatch.setattr(graft.stages, "save_checkpoint", save_then_stop)
    args = ["train", str(small_shapes), "--out", str(run), "--backbone", name]
    assert main([*args, "--weights", config["weights"], *TRAIN]) == 130
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(graft.stages, "save_checkpoint", saved)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    for a, b in zip(csv.DictReader(open(run / "history.csv")),
                    csv.DictReader(open(whole / "history.csv")), strict=True):  # fmt: skip
        assert {k: a[k] for k in ("stage", "epoch", "train_loss", "val_loss")} == {
            k: b[k] for k in ("stage", "epoch", "train_loss", "val_loss")
        }
    resumed, uninterrupted = (
        load_file(str(run / "model.safetensors")),
        load_file(str(whole / "model.safetensors")),
    )
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
