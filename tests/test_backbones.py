from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graft.backbones import BACKBONES, create_imagenet_model, get_spec
from graft.errors import UsageError, WeightsError
from graft.model import create_backbone


def test_every_registry_entry_is_complete() -> None:
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert len(spec.mean) == 3 and len(spec.std) == 3
        assert all(0 < s <= 1 for s in spec.std)
        assert spec.native_img_size >= 128
        assert spec.weights_help and spec.description


def test_unknown_backbone_lists_the_valid_names() -> None:
    with pytest.raises(UsageError) as err:
        get_spec("resnet9000")
    for name in BACKBONES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_imagenet_weights_see_a_cat_in_chelsea(name: str) -> None:
    """The key mapping from efficientnet-pytorch to timm is right only if a real photo of a
    cat comes out as a cat (ImageNet classes 281-285)."""
    from skimage import data

    spec = get_spec(name)
    model, source = create_imagenet_model(spec, allow_download=False)
    assert source.startswith("pypi:")
    size = spec.native_img_size
    image = Image.fromarray(data.chelsea()).resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"{name} sees class {top}, not a cat"
    assert float(probs[281:286].sum()) > 0.5


def test_backbone_outputs_pooled_features() -> None:
    backbone, _ = create_backbone("efficientnet_lite0", allow_download=False)
    with torch.no_grad():
        out = backbone.eval()(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, backbone.num_features) == (2, 1280)
    assert len(backbone.blocks) == 9


def test_vgg16_without_weights_offline_says_how_to_get_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError) as err:
        create_backbone("vgg16", allow_download=False)
    text = str(err.value)
    assert "--weights" in text and "vgg16-397923af.pth" in text and "--no-pretrained" in text


def test_vgg16_loads_a_local_weights_file(vgg16_weights: Path) -> None:
    from safetensors.torch import load_file

    backbone, source = create_backbone("vgg16", weights=vgg16_weights, allow_download=False)
    assert source == str(vgg16_weights)
    expected = load_file(str(vgg16_weights))
    assert torch.equal(backbone.blocks[0][0].weight, expected["features.0.weight"])
    assert torch.equal(backbone.blocks[4][-3].bias, expected["features.28.bias"])
    assert len(backbone.blocks) == 5 and backbone.num_features == 512
    with torch.no_grad():
        assert backbone.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def test_vgg16_weights_from_the_torch_cache(tmp_path: Path, monkeypatch, vgg16_weights) -> None:
    from safetensors.torch import load_file

    cache = tmp_path / "torch-home"
    (cache / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(load_file(str(vgg16_weights)), cache / "hub" / "checkpoints" / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(cache))
    _, source = create_backbone("vgg16", allow_download=False)
    assert source.endswith("vgg16-397923af.pth")


def test_truncated_or_wrong_weights_file_is_a_clear_error(tmp_path: Path, vgg16_weights) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(vgg16_weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="Could not read weights file"):
        create_backbone("vgg16", weights=truncated)
    with pytest.raises(WeightsError, match="do not fit efficientnet_lite0"):
        create_backbone("efficientnet_lite0", weights=vgg16_weights)
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("vgg16", weights=tmp_path / "nope.pth")
