"""Small file helpers: every file a run writes goes through here, atomically.

A file is written to a temporary name in the same folder and renamed into place, so a run
killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 (and safetensors re-creates the file 0600): give it the
        # permissions a plain open() would, like every other file of the run.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno is not None and exc.filename == tmp:
            # say which file could not be written, not the temporary one (gone now)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        code = _os_error_code(exc)
        if code is not None:  # a library's wrapped OS error: the disk, not a bug
            raise OSError(code, os.strerror(code), str(path)) from exc
        raise


def _os_error_code(exc: BaseException) -> int | None:
    """The errno inside an error a library raised for a failed write: safetensors (Rust)
    says "I/O error: No space left on device (os error 28)" in a SafetensorError, which is
    not an OSError."""
    match = re.search(r"\(os error (\d+)\)|\bOs \{ code: (\d+)", str(exc))
    return int(match.group(1) or match.group(2)) if match else None


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        # surrogateescape: file names that are not valid UTF-8 survive a round trip.
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic(path, write)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save(path: Path, save: Callable[[str], None]) -> None:
    """Atomically write a file produced by a library's ``save(filename)`` (plots, weights)."""
    _atomic(path, save)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def display(path: object) -> str:
    """A path as printable text: bytes that are not UTF-8 become U+FFFD instead of crashing
    the console."""
    text = str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def shell_path(path: object) -> str:
    """A path as it must be typed in a shell command graft suggests (quoted when it has
    spaces or other special characters), printable like :func:`display`."""
    import shlex

    return shlex.quote(display(path))


def check_output_file(path: str | Path, option: str, suffix: str) -> Path:
    """``path`` may be written by graft as ``option`` (``--plot``, ``--out``): a file name
    ending in ``suffix`` that is new or was written by graft before. A folder, another kind
    of file, or a file graft did not write is a usage error: graft never overwrites yours."""
    from .errors import UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder: give a file name ending in {suffix}.")
    if path.suffix.lower() != suffix:
        raise UsageError(f"{option} {path}: give a file name ending in {suffix}.")
    if path.exists() and not _written_by_graft(path, suffix):
        raise UsageError(
            f"{option} {path} exists and was not written by graft, so it is left as it is. "
            "Choose another name, or delete the file first."
        )
    return path


def check_output_folder(path: str | Path, option: str) -> Path:
    """An output folder for ``graft evaluate``: new, empty, or an earlier evaluation."""
    from .errors import UsageError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file: give a folder.")
    if path.is_dir() and any(path.iterdir()):
        try:
            earlier = read_json(path / "evaluation.json")
            ours = isinstance(earlier, dict) and {"accuracy", "per_class"} <= set(earlier)
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UsageError(
                f"{option} {path} holds files that are not an earlier graft evaluation, so "
                "graft does not write there. Choose a new or empty folder."
            )
    return path


#: what marks a file as graft's: PNG text chunks matplotlib writes for graft's figures
#: ("Software"), and the generator of graft's HTML report
_PNG_SOFTWARE = ("graft", "Matplotlib")
_HTML_MARKS = ('<meta name="generator" content="graft', "<title>graft run:")


def png_by_graft(path: Path) -> bool:
    """Whether ``path`` is a PNG carrying graft's own mark (Software="graft"), not merely one
    made with Matplotlib: the test before graft deletes a figure rather than replaces it."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and str(im.info.get("Software", "")).startswith("graft")
    except Exception:  # unreadable or not an image: not graft's
        return False


def _written_by_graft(path: Path, suffix: str) -> bool:
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                software = str(im.info.get("Software", ""))
            return im.format == "PNG" and software.startswith(_PNG_SOFTWARE)
        if suffix == ".html":
            with open(path, encoding="utf-8", errors="replace") as fh:
                head = fh.read(4096)
            return any(mark in head for mark in _HTML_MARKS)
    except Exception:  # unreadable or not an image: not graft's
        return False
    return False
