"""Finding image files: the extensions graft reads, walking folders, and content hashes.

Torch-free on purpose, like graft.data: ``graft predict`` and ``graft evaluate`` on a run
with a current export never import torch (the datasets and loaders are in graft.loading).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

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


def decode_error_kind(exc: BaseException) -> str:
    """What went wrong decoding an image: ``"too_large"`` (a decompression bomb),
    ``"not_image"`` (no decoder recognises it) or ``"corrupt"`` (anything else)."""
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "too_large"
    if isinstance(exc, Image.UnidentifiedImageError) or "cannot identify image file" in str(exc):
        return "not_image"
    return "corrupt"


def describe_decode_error(exc: BaseException) -> str:
    """A short reason for the skipped-files list."""
    if isinstance(exc, FileNotFoundError):
        return "no such file (check the path)"
    text = str(exc) or type(exc).__name__
    kind = decode_error_kind(exc)
    if kind == "too_large":
        return f"refused: image too large ({text})"
    if kind == "not_image":
        return "not an image (or an unsupported format)"
    if "truncated" in text.lower() or "broken" in text.lower():
        return f"truncated or corrupt image ({text})"
    return text
