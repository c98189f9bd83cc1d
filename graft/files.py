"""Finding image files: the extensions graft reads, walking folders, and content hashes.

Torch-free on purpose: ``graft predict`` on a run with a current export imports this, not
graft.data (which pulls in torch for its datasets and loaders).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_run_folder(folder: Path) -> bool:
    """A folder graft wrote (a run or an export): its plots are not training images."""
    names = ("graft-files.json", "graft_metadata.json", "graft_runtime.py")
    if any((folder / n).is_file() for n in names):
        return True
    return (folder / "config.json").is_file() and (
        (folder / "split.csv").is_file() or (folder / "model.safetensors").is_file()
    )


def iter_files(folder: Path) -> Iterable[Path]:
    # followlinks=False: a symlink loop cannot send the walk round forever.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not is_run_folder(here / d)
        )
        for name in sorted(filenames):
            if not name.startswith("."):
                yield here / name


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively) to the images inside them."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(f for f in iter_files(p) if f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(p)  # missing or unreadable files become per-file errors
    return out
