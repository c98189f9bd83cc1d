"""Frozen features: the backbone's outputs below a cut, computed once per image (and per
augmented view) and kept in the on-disk cache.

One path serves everything that needs them: training (activations at the fine-tuning cut,
or pooled features), the duplicate audit of ``graft scan`` and ``graft train``, the
learning-rate finder and ``--backbone auto``. All of them preprocess with the transform the
model's own description gives (input size, normalisation, background trim), so they see the
same pixels and share the cache.

    features = FrozenFeatures(model, weights_source, cut=model.n_blocks)
    pooled = features.views(data, range(len(data.paths)))      # [N, num_features]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import FeatureCache, item_seed, open_cache
from .data import ScanResult
from .device import Device, choose_device
from .engines import Runner, TorchRunner, make_runner, wanted_engine
from .errors import DataError
from .loading import ImageFiles, ImageViews, make_loader, transform_for
from .model import GraftModel
from .predictions import ScorePredictor
from .progress import Reporter

__all__ = ["CachedScores", "FrozenFeatures", "extract", "logits_cached", "pool_cached"]


#: rows per call of the frozen network: OpenVINO's static shapes ran the lite0 frozen part
#: at 128 px 10% faster at 16 than at 64 here (the activations stay in the core's caches)
RUN_BATCH = 16

#: A job of the frozen part smaller than this many images at 128 px (scaled by the input's
#: area) runs on PyTorch: exporting the part to ONNX and compiling it for OpenVINO costs
#: 0.8-1.0 s here, which the faster engine wins back only after about 216 images at 128 px
#: (766 at 64 px, 93 at 224: 191-285 in 128 px units; BENCHMARKS.md "Which engine for a
#: small job").
#: ``GRAFT_ENGINE`` set to an engine uses that engine for every job.
FAST_ENGINE_MIN_IMAGES = 250


@torch.no_grad()
def extract(
    runner: Runner,
    dataset: ImageFiles,
    batch_size: int,
    workers: int,
    seed: int,
    reporter: Reporter,
    label: str,
) -> torch.Tensor:
    """Run the frozen part of the backbone once over ``dataset``; returns its outputs in
    dataset order (activations at the cut, or pooled feature vectors): ``[N, ...]``, or
    ``[N, views, ...]`` for an :class:`~graft.loading.ImageViews`."""
    loader = make_loader(dataset, batch_size, shuffle=False, seed=seed, workers=workers)
    out: torch.Tensor | None = None
    with reporter.bar(label, len(dataset)) as advance:
        for batch in loader:
            if batch["failed"]:
                # Files were checked by scan; one that breaks now (changed on disk) is fatal
                # for a cache that must hold every image, so say which one.
                index, reason = batch["failed"][0]
                raise DataError(f"{dataset.paths[index]} could not be read any more: {reason}")
            images, index = batch["images"], batch["index"]
            views = images.shape[1] if images.dim() == 5 else 0
            # rows of ``out`` flattened over views: where each row of the batch goes
            rows = (index[:, None] * views + torch.arange(views)).flatten() if views else index
            flat = images.flatten(0, 1) if views else images
            for i in range(0, len(flat), RUN_BATCH):
                maps = runner(flat[i : i + RUN_BATCH])
                if out is None:
                    per_view = (views,) if views else ()
                    out = torch.empty((len(dataset), *per_view, *maps.shape[1:]))
                (out.flatten(0, 1) if views else out)[rows[i : i + RUN_BATCH]] = maps
            advance(len(index))
    assert out is not None
    return out


class FrozenFeatures:
    """The frozen part of ``model`` below block ``cut``, run over images through the cache.

    View 0 is the clean (unaugmented) image; views 1.. are augmented with ``augment``, each
    image's augmentation seeded from its own content hash, the view and ``seed``.
    """

    def __init__(
        self,
        model: GraftModel,
        weights_source: str,
        cut: int | None = None,
        *,
        cache_dir: str | None = None,
        augment: str = "none",
        seed: int = 0,
        workers: int = 0,
        device: Device | None = None,
        reporter: Reporter | None = None,
        ddp: Any = None,
    ):
        info = model.info
        self.cut = model.n_blocks if cut is None else cut
        self.img_size, self.augment, self.seed = info.img_size, augment, seed
        self.workers, self.ddp = workers, ddp
        self.reporter = reporter or Reporter()
        self.device = device or choose_device()
        self.transforms = {
            "clean": transform_for(info.preprocessing),
            "augmented": transform_for(info.preprocessing, augment),
        }
        self.cache: FeatureCache = open_cache(
            cache_dir,
            info.backbone,
            weights_source,
            info.img_size,
            self.cut,
            model.n_blocks,
            info.trim,
            info.detail_size,
            warn=self.reporter.warn,
        )
        self._part = model.frozen_part(self.cut)
        self._fast: Runner | None = None
        self._torch = TorchRunner(self._part, self.device)
        #: the engines that ran jobs so far (their names, in order of first use)
        self.engines_used: list[str] = []

    @property
    def runner(self) -> Runner:
        """The fastest engine for the frozen part (exported and compiled on first use)."""
        if self._fast is None:
            notes: list[str] = []  # an engine that failed to load (the next one ran)
            self._fast = make_runner(self._part, self.img_size, self.device, notes=notes)
            for note in notes:
                self.reporter.warn(note)
        return self._fast

    def runner_for(self, images: int) -> Runner:
        """The engine for a job of ``images`` passes: PyTorch when the job is too small to
        pay for the export and compile (:data:`FAST_ENGINE_MIN_IMAGES`), unless
        ``GRAFT_ENGINE`` names an engine. By the job's size alone, so the same job runs on
        the same engine in a resumed run as in the uninterrupted one."""
        work = images * (self.img_size / 128) ** 2
        if work < FAST_ENGINE_MIN_IMAGES and not wanted_engine():
            runner = self._torch
            if self.device.channels_last:  # as the fast engine's export leaves it
                self._part.to(memory_format=torch.channels_last)
        else:
            runner = self.runner
        if runner.name not in self.engines_used:
            self.engines_used.append(runner.name)
        return runner

    @classmethod
    def pretrained(
        cls, config: Any, data: ScanResult, reporter: Reporter | None = None
    ) -> FrozenFeatures:
        """Pooled features of ``config``'s pretrained backbone, preprocessed as a run with
        ``config`` on ``data`` would (size, normalisation, trim, detail size): for the audit
        of ``graft scan`` and the learning-rate finder."""
        from .detail import new_model_info
        from .model import build_model

        info = new_model_info(config, data, reporter=reporter)
        model, source = build_model(info, config.pretrained, config.weights, config.allow_download)
        return cls(model, source, cache_dir=config.cache_dir, seed=config.seed, reporter=reporter)

    def _name(self, view: int) -> str:
        return "clean" if view == 0 else f"{self.augment}-seed{self.seed}-view{view}"

    def augmented_views(
        self, data: ScanResult, indices: Sequence[int], n_views: int, label: str
    ) -> list[torch.Tensor]:
        """Augmented views 1 .. ``n_views - 1`` of ``data``'s images at ``indices``, through
        the cache. Views that miss the same images (all of them on a cold cache; the new
        ones after ``--views`` grew) are made in one pass, each image decoded once for all
        of them; a view alone, and every view under torchrun, view by view."""
        indices, views = list(indices), list(range(1, n_views))
        shas = [data.sha256[i] for i in indices]
        groups: dict[tuple[int, ...], list[int]] = {}
        if not (self.ddp is not None and self.ddp.active):
            for v in views:
                groups.setdefault(tuple(self.cache.missing(self._name(v), shas)), []).append(v)
        made: dict[int, torch.Tensor] = {}
        for group in groups.values():
            if len(group) < 2:
                continue
            files = ImageViews(
                [data.paths[i] for i in indices],
                [data.labels[i] for i in indices],
                self.transforms["augmented"],
                self.img_size,
                [[item_seed(h, v, self.seed) for v in group] for h in shas],
            )
            text = f"{label} ({len(group)} per image, each image decoded once)"
            together = self.cache.get_or_compute_views(
                [self._name(v) for v in group],
                shas,
                lambda missing, f=files, t=text: self._extract(f.subset(missing), t).unbind(1),
            )
            if together is not None:  # None: the cache changed under us; view by view
                made.update(zip(group, together, strict=True))
        return [
            made[v] if v in made else self.views(data, indices, v, f"{label} ({v}/{len(views)})")
            for v in views
        ]

    def transient_views(
        self,
        paths: Sequence[Path],
        transform: Callable[[Any], torch.Tensor],
        seeds: Sequence[Sequence[int]],
        label: str,
    ) -> torch.Tensor:
        """The frozen part's outputs for seeded views of ``paths`` under ``transform``
        (``seeds[i]``: one per view of image ``i``), decoded once per image and not stored:
        ``[N, views, ...]``."""
        return self._extract(ImageViews(paths, None, transform, self.img_size, seeds), label)

    def _extract(self, files: ImageFiles, label: str) -> torch.Tensor:
        views = len(files.view_seeds[0]) if isinstance(files, ImageViews) and len(files) else 1
        runner = self.runner_for(len(files) * views)
        return extract(runner, files, 64, self.workers, self.seed, self.reporter, label)

    def views(
        self,
        data: ScanResult,
        indices: Sequence[int],
        view: int = 0,
        label: str = "Computing backbone features",
    ) -> torch.Tensor:
        """Outputs for ``data``'s images at ``indices`` (view 0: clean), in that order;
        only images missing from the cache are computed."""
        indices = list(indices)
        shas = [data.sha256[i] for i in indices]
        name = self._name(view)
        files = ImageFiles(
            [data.paths[i] for i in indices],
            [data.labels[i] for i in indices],
            self.transforms["clean" if view == 0 else "augmented"],
            self.img_size,
            [item_seed(h, view, self.seed) for h in shas] if view else None,
        )
        return self.cache.get_or_compute(
            name,
            shas,
            lambda missing: self._extract(files.subset(missing), label),
            self.ddp,
        )


@torch.no_grad()
def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    maps: torch.Tensor,
    device: Device,
    batch: int = 256,
) -> torch.Tensor:
    """``fn`` over cached activations in batches, on the device, results on CPU."""
    out = []
    for i in range(0, len(maps), batch):
        with device.context():
            out.append(fn(device.prepare(maps[i : i + batch])).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def logits_cached(model: GraftModel, maps: torch.Tensor, cut: int, device: Device) -> torch.Tensor:
    """Logits from activations cached at block ``cut``."""
    return _batched(lambda x: model.forward_from(x, cut), maps, device)


def pool_cached(model: GraftModel, maps: torch.Tensor, cut: int, device: Device) -> torch.Tensor:
    """Pooled features from activations cached at block ``cut`` (frozen top, no grad)."""
    return _batched(lambda x: model.pooled_from(x, cut), maps, device)


class CachedScores(ScorePredictor):
    """Scores of images whose activations at block ``cut`` are cached (``maps``, in the
    order of the paths it is asked about): the end-of-run evaluation of the held-out split
    without decoding its images again or running the frozen blocks a second time.

    Only valid while the blocks below ``cut`` are those that made the cache (stage 2 trains
    above the cut, on cached activations); the numbers are those of the exported model
    within the engines' 1e-4 (tests/test_engines.py)."""

    def __init__(self, model: GraftModel, maps: torch.Tensor, cut: int, device: Device):
        info = model.info
        self.model, self.maps, self.cut = model, maps, cut
        # fp32 even where training autocasts: these are the numbers the fp32 export gives
        self.device = replace(device, autocast=None)
        self.classes = list(info.classes)
        self.unknown_threshold = info.unknown_threshold
        self.familiarity_threshold = info.familiarity_threshold
        self.has_familiarity = model.familiarity is not None

    @torch.no_grad()
    def iter_scores(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[int, str]]]:
        if len(paths) != len(self.maps):
            raise ValueError(f"{len(paths)} paths for {len(self.maps)} cached rows")
        model = self.model.eval()
        pooled = pool_cached(model, self.maps, self.cut, self.device)
        logits = _batched(model.head, pooled, self.device)
        probs = (logits / model.info.temperature).softmax(1).numpy()
        familiarity = None
        if model.familiarity is not None:
            familiarity = _batched(model.familiarity, pooled, self.device).numpy()
        index = np.arange(len(paths))
        yield self._finite(index, probs, familiarity, {})
