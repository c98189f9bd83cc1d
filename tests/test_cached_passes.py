"""Passes over a run's images that reuse what the cache already holds (issue 17): the
end-of-run evaluation scores the held-out split from its cached activations at the cut, and
the augmented views of an image come from one decode. Both must give what the long way
gives: the evaluation what the exported model gives on the decoded images (within 1e-4),
the views exactly the rows a view-by-view pass stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_evaluate_fast import differences

from graft.cache import FeatureCache, item_seed
from graft.data import scan
from graft.evaluate import EVALUATION, evaluate_run
from graft.loading import ImageFiles, ImageViews, build_transform


def test_the_end_of_run_evaluation_is_what_the_export_gives_on_the_images(
    trained_run: Path, tmp_path: Path
) -> None:
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    summary = json.loads((run / "summary.json").read_text())
    assert "on cached activations at the cut" in summary["plan"]  # the cached path
    at_end = json.loads((run / EVALUATION).read_text())
    again = evaluate_run(run, out_dir=tmp_path / "again")  # decodes, runs model.onnx
    assert at_end["n"] == again["n"] > 0
    assert differences(at_end, json.loads((tmp_path / "again" / EVALUATION).read_text())) == []
    assert summary["test"]["accuracy"] == pytest.approx(again["accuracy"], abs=1e-9)


def test_one_decode_gives_each_view_exactly_as_a_pass_per_view(shapes_dir: Path) -> None:
    data = scan(shapes_dir)
    tf = build_transform(64, (0.5,) * 3, (0.5,) * 3, "light")
    seeds = [[item_seed(h, v, 3) for v in (1, 2, 3)] for h in data.sha256[:6]]
    together = ImageViews(data.paths[:6], None, tf, 64, seeds)
    for i in range(6):
        stacked, _, index = together[i]
        assert index == i and stacked.shape == (3, 3, 64, 64)
        for k in range(3):
            alone = ImageFiles(data.paths[:6], None, tf, 64, [s[k] for s in seeds])[i][0]
            assert torch.equal(stacked[k], alone)
        assert not torch.equal(stacked[0], stacked[1])  # the views are not one view thrice


def test_views_made_together_are_stored_as_views_made_apart(tmp_path: Path) -> None:
    shas = [f"{i:064x}" for i in range(10)]
    calls: list[list[int]] = []

    def rows(view: int, ix: list[int]) -> torch.Tensor:
        return torch.tensor([[float(i), float(view)] for i in ix])

    def together(ix: list[int]) -> list[torch.Tensor]:
        calls.append(ix)
        return [rows(1, ix), rows(2, ix)]

    cache = FeatureCache(tmp_path, {"k": "together"}, warn=lambda _: None)
    out = cache.get_or_compute_views(["v1", "v2"], shas, together, chunk=4)
    assert out is not None and calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(out[0], rows(1, list(range(10))))
    assert torch.equal(out[1], rows(2, list(range(10))))
    assert (cache.hits, cache.misses) == (0, 20)
    # What was stored is what the one-view path reads back, with nothing computed.
    reader = FeatureCache(tmp_path, {"k": "together"}, warn=lambda _: None)
    never = lambda ix: pytest.fail(f"computed {ix}")  # noqa: E731
    assert torch.equal(reader.get_or_compute("v2", shas, never), out[1])
    # All stored: read back together, nothing computed.
    calls.clear()
    again = reader.get_or_compute_views(["v1", "v2"], shas, together)
    assert again is not None and calls == [] and torch.equal(again[0], out[0])
    # A view that misses other images than its sibling: the caller goes view by view.
    assert reader.get_or_compute_views(["v1", "v3"], shas, together) is None
    assert calls == []


def test_exact_copies_are_computed_once_so_a_cold_cache_reads_as_a_warm_one(
    tmp_path: Path,
) -> None:
    """Two files with the same content share a cache row. Computed twice (in another
    batch, at another position, on another engine) they could differ in the last bits, and
    the cold run would train on other numbers than the warm run that reads the one row
    back (found: head weights 0.08 apart between the two). Each hash is computed once."""
    shas = ["a" * 64, "b" * 64, "a" * 64, "c" * 64, "a" * 64]
    calls: list[list[int]] = []

    def by_position(ix: list[int]) -> torch.Tensor:  # what a position-dependent engine does
        calls.append(ix)
        return torch.tensor([[float(i)] for i in ix])

    cold = FeatureCache(tmp_path, {"k": "copies"}, warn=lambda _: None)
    out = cold.get_or_compute("clean", shas, by_position, chunk=2)
    assert calls == [[0, 1], [3]]
    assert out.flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 0.0]
    warm = FeatureCache(tmp_path, {"k": "copies"}, warn=lambda _: None)
    never = lambda ix: pytest.fail(f"computed {ix}")  # noqa: E731
    assert torch.equal(warm.get_or_compute("clean", shas, never), out)

    calls.clear()
    views = cold.get_or_compute_views(["v1", "v2"], shas, lambda ix: [by_position(ix)] * 2)
    assert views is not None and calls == [[0, 1, 3]]
    for view in views:
        assert view.flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 0.0]
    assert torch.equal(warm.get_or_compute("v2", shas, never), views[1])


def test_a_damaged_shard_of_one_view_is_made_again(tmp_path: Path) -> None:
    shas = [f"{i:064x}" for i in range(4)]
    made = [torch.arange(8.0).reshape(4, 2), -torch.arange(8.0).reshape(4, 2)]
    cache = FeatureCache(tmp_path, {"k": "damaged"}, warn=lambda _: None)
    cache.get_or_compute_views(["a", "b"], shas, lambda ix: [m[ix] for m in made])
    shard = next((cache.folder / "view-b").glob("*.safetensors"))
    blob = bytearray(shard.read_bytes())
    blob[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes +inf: the checksum fails
    shard.write_bytes(bytes(blob))
    warnings: list[str] = []
    reader = FeatureCache(tmp_path, {"k": "damaged"}, warn=warnings.append)
    out = reader.get_or_compute_views(["a", "b"], shas, lambda ix: [m[ix] for m in made])
    assert out is not None and torch.equal(out[1], made[1]) and torch.equal(out[0], made[0])
    assert len(warnings) == 1 and "damaged" in warnings[0]


def test_colour_changes_go_where_there_are_fewer_pixels() -> None:
    from PIL import Image

    from graft.loading import ColourAtSmallerSize

    order: list[str] = []

    def step(name: str, size: int | None = None):
        def apply(im: Image.Image) -> Image.Image:
            order.append(f"{name}@{im.width}")
            return im.resize((size, size)) if size else im

        return apply

    both = ColourAtSmallerSize(step("crop", 128), step("colour"), 128)
    both(Image.new("RGB", (40, 30)))  # a sprite: its 1,200 pixels, not the crop's 16,384
    assert order == ["colour@40", "crop@40"]
    order.clear()
    both(Image.new("RGB", (500, 375)))  # a photo: the crop is the smaller
    assert order == ["crop@500", "colour@128"]


def test_a_shard_that_cannot_be_opened_is_said_removed_and_made_again(tmp_path: Path) -> None:
    shas = [f"{i:064x}" for i in range(4)]
    rows = torch.arange(8.0).reshape(4, 2)
    FeatureCache(tmp_path, {"k": "cut"}, warn=lambda _: None).get_or_compute(
        "v", shas, lambda ix: rows[ix]
    )
    shard = next(tmp_path.glob("*/view-v/*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated: its header no longer reads
    warnings: list[str] = []
    again = FeatureCache(tmp_path, {"k": "cut"}, warn=warnings.append)
    assert torch.equal(again.get_or_compute("v", shas, lambda ix: rows[ix]), rows)
    assert again.misses == 4 and len(warnings) == 1 and str(shard) in warnings[0]
    assert "damaged" in warnings[0] and "unreadable" in warnings[0]


def test_new_views_are_made_together_when_views_grow(shapes_dir: Path, tmp_path: Path) -> None:
    """--views 3, then 5 on the same cache: views 1-2 are read, 3-4 made in one pass."""
    import graft.features
    from graft.backbones import get_spec
    from graft.features import FrozenFeatures
    from graft.model import ModelInfo, build_model

    data = scan(shapes_dir)
    spec = get_spec("efficientnet_lite0")
    info = ModelInfo("efficientnet_lite0", 64, spec.mean, spec.std, tuple(data.classes))
    model, source = build_model(info, True, None, False)
    passes: list[tuple[str, int]] = []
    real = graft.features.extract

    def spy(runner, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        passes.append((type(dataset).__name__, len(getattr(dataset, "view_seeds", [[0]])[0])))
        return real(runner, dataset, *args, **kwargs)

    def frozen() -> FrozenFeatures:
        return FrozenFeatures(model, source, cache_dir=str(tmp_path), augment="light")

    idx = list(range(0, len(data.paths), 3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graft.features, "extract", spy)
        three = frozen().augmented_views(data, idx, 3, "views")
        assert passes == [("ImageViews", 2)]
        passes.clear()
        five = frozen().augmented_views(data, idx, 5, "views")
        assert passes == [("ImageViews", 2)]  # views 3 and 4 together; 1 and 2 read back
    assert len(five) == 4 and all(torch.equal(a, b) for a, b in zip(three, five[:2], strict=True))
    assert not torch.equal(five[2], five[3])


def test_the_fused_normalisation_gives_torchvisions_numbers_exactly() -> None:
    # The cache keys its rows by transform version: the fused ToTensor + Normalize must not
    # change a single bit, or old caches would hold rows the new code cannot reproduce.
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from graft.loading import ToNormalizedTensor

    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    fused = ToNormalizedTensor(mean, std)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")
    grey = Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L")
    assert torch.equal(fused(rgb), reference(rgb))
    assert fused(rgb).shape == (3, 37, 53)
    grey_reference = T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))])
    assert torch.equal(ToNormalizedTensor((0.5,), (0.5,))(grey), grey_reference(grey))


def test_the_exports_preprocessing_gives_the_training_transforms_numbers_exactly() -> None:
    # predict/serve (graft.runtime, numpy, no torch) and training (graft.loading, torch)
    # normalise with separate code: the network must see the same inputs bit for bit.
    import numpy as np
    from PIL import Image

    from graft.runtime import Preprocessing, preprocess

    rng = np.random.default_rng(1)
    pre = Preprocessing(size=48, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        for h, w in ((48, 48), (31, 70), (90, 40))
    ]
    batch = preprocess(images, pre)
    train = build_transform(pre.size, pre.mean, pre.std, "none")
    for row, image in zip(batch, images, strict=True):
        assert torch.equal(torch.from_numpy(row), train(image))
