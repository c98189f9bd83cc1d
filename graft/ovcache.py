"""OpenVINO's model cache on disk, kept by graft: a compiled model is read back instead of
compiled again by the next process that predicts from, serves or evaluates the same graph.

OpenVINO writes one ``.blob`` per compiled model into the ``CACHE_DIR`` it is given and
names it by a hash of the model's content, its input shape and the compile settings, so a
changed graph never reads an old blob. Measured on a 2-core CPU (EfficientNet-Lite0 at
64 px): one batch shape compiles in about 0.65 s and loads from the cache in about 0.3 s; the
seven shapes ``graft serve`` warms up, 2.7 s against 0.9 s (a cold ``graft serve`` is ready
in 3.0 s instead of 4.3 s). Each blob holds a copy of the weights (14 MB for
EfficientNet-Lite0; 93 MB for the seven shapes), which is what this module keeps in check:

* Layout ``ROOT/<sha256 of the ONNX file, 16 hex>/<batch size or "dynamic">/<blob>``: one
  folder per graph, one per shape, so only the blob about to be read is checked.
* OpenVINO does not verify a blob: a damaged one loads and answers wrongly (measured: 1000
  zeroed bytes changed the outputs by 4e-3, silently). graft writes the sha256 of each new
  blob beside it (``<blob>.sha256``) and, before each compile, removes a blob whose checksum
  is missing or does not match; OpenVINO then compiles and writes it again.
* OpenVINO never deletes anything. Each use touches the graph's folder; when a blob is
  written, graph folders unused for :data:`KEEP_DAYS` days are removed.
* The cache never fails a prediction: a folder that cannot be created or written, or a
  compile that fails with the cache, falls back to compiling without it (logged at debug
  level on the ``graft.ovcache`` logger).

Location: ``$GRAFT_CACHE_DIR/openvino``, else ``$XDG_CACHE_HOME/graft/openvino``
(``~/.cache/graft/openvino``). ``GRAFT_OPENVINO_CACHE=off`` (or ``0``) turns it off, a
folder path puts it there (``on`` or ``1``: the default place); deleting the folder at any
time is safe.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from .files import file_sha256

log = logging.getLogger(__name__)

#: graph folders not used for this many days are removed when the cache is next written
KEEP_DAYS = 30
#: values of GRAFT_OPENVINO_CACHE that turn the cache off, and those that keep its default
#: place (any other value is a folder)
OFF = ("0", "off", "false", "no")
ON = ("", "1", "on", "true", "yes")
CHECKSUM = ".sha256"


def cache_root() -> Path | None:
    """The folder of OpenVINO's compiled models, or None when ``GRAFT_OPENVINO_CACHE`` turns
    the cache off. Beside graft's feature cache (graft.cache), under the same variables,
    unless ``GRAFT_OPENVINO_CACHE`` names a folder."""
    value = os.environ.get("GRAFT_OPENVINO_CACHE", "").strip()
    if value.lower() in OFF:
        return None
    if value.lower() not in ON:
        return Path(value).expanduser()
    if os.environ.get("GRAFT_CACHE_DIR"):
        return Path(os.environ["GRAFT_CACHE_DIR"]) / "openvino"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graft" / "openvino"


class CompiledCache:
    """The compiled forms of one ONNX graph: a ``CACHE_DIR`` per input shape, each blob
    checked against the checksum graft wrote when OpenVINO made it."""

    def __init__(self, root: Path, onnx_path: Path):
        self.root = root
        self.folder = root / file_sha256(onnx_path)[:16]

    @classmethod
    def open(cls, onnx_path: Path) -> CompiledCache | None:
        """The cache of ``onnx_path``'s graph, marked as used now; None when the cache is
        off or its folder cannot be created or written."""
        root = cache_root()
        if root is None:
            return None
        try:
            cache = cls(root, onnx_path)
            cache.folder.mkdir(parents=True, exist_ok=True)
            if not os.access(cache.folder, os.W_OK | os.X_OK):
                raise PermissionError(f"{cache.folder} is not writable")
            os.utime(cache.folder)  # used now: kept by pruning for another KEEP_DAYS
        except OSError as exc:
            log.debug("OpenVINO model cache off: %s", exc)
            return None
        return cache

    def shape_dir(self, batch: int) -> Path | None:
        """The ``CACHE_DIR`` for batch size ``batch`` (0: a dynamic batch axis), after
        removing any blob in it whose checksum is missing or wrong; None when it cannot be
        made (compile without the cache)."""
        folder = self.folder / (str(batch) if batch else "dynamic")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for blob in folder.glob("*.blob"):
                if not _intact(blob):
                    log.debug("OpenVINO model cache: removing %s (checksum)", blob)
                    blob.unlink(missing_ok=True)
                    blob.with_name(blob.name + CHECKSUM).unlink(missing_ok=True)
        except OSError as exc:
            log.debug("OpenVINO model cache not used for %s: %s", folder, exc)
            return None
        return folder

    def record(self, folder: Path) -> None:
        """After a compile into ``folder``: the checksum of each blob OpenVINO just wrote,
        and, when there was one, the removal of graphs unused for :data:`KEEP_DAYS` days."""
        wrote = False
        try:
            for blob in folder.glob("*.blob"):
                checksum = blob.with_name(blob.name + CHECKSUM)
                if not checksum.exists():
                    from .io import atomic_write_text

                    atomic_write_text(checksum, file_sha256(blob) + "\n")
                    wrote = True
        except OSError as exc:
            log.debug("OpenVINO model cache: no checksum written in %s: %s", folder, exc)
        if wrote:
            prune(self.root, keep=self.folder)


def _intact(blob: Path) -> bool:
    """Whether ``blob`` is the file whose checksum graft wrote beside it."""
    try:
        expected = blob.with_name(blob.name + CHECKSUM).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return expected == file_sha256(blob)


def _is_graph_folder(folder: Path) -> bool:
    """Whether ``folder`` is one graft made (:class:`CompiledCache`): named by 16 hex digits
    of a graph's hash, holding only shape folders of blobs and their checksums. The cache's
    root may be a folder the user named (``GRAFT_OPENVINO_CACHE``), so nothing else in it is
    ever removed."""
    if not re.fullmatch(r"[0-9a-f]{16}", folder.name) or folder.is_symlink():
        return False
    for shape in folder.iterdir():
        if shape.is_symlink() or not shape.is_dir():
            return False
        if not (shape.name == "dynamic" or shape.name.isdigit()):
            return False
        for item in shape.iterdir():
            if not item.is_file() or not item.name.endswith((".blob", ".blob" + CHECKSUM)):
                return False
    return True


def prune(root: Path, keep: Path | None = None, days: float = KEEP_DAYS) -> list[Path]:
    """Remove the graph folders under ``root`` not used for ``days`` days (their
    modification time, which each use refreshes), except ``keep``; returns them. Only
    folders graft made go (:func:`_is_graph_folder`)."""
    cutoff = time.time() - days * 86400
    removed = []
    try:
        folders = [p for p in root.iterdir() if p.is_dir() and p != keep]
    except OSError:
        return []
    for folder in folders:
        try:
            if folder.stat().st_mtime < cutoff and _is_graph_folder(folder):
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError as exc:  # another process, or a file made read-only: next time
            log.debug("OpenVINO model cache: could not remove %s: %s", folder, exc)
    return removed
