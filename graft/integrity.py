"""Checks of what a run folder records before graft relies on it (resume, evaluate).

A run stores hashes and lengths; they are compared with what is found, so a damaged or
edited file is refused with a sentence naming it instead of being used silently:

- ``split.csv``: every row well-formed (:func:`read_split_rows`), and as many rows as the
  run recorded (config.json's ``split_csv``, summary.json's split sizes, audit.json's image
  count), with the same SHA-256 when config.json holds it (:func:`check_split_record`);
- the images it lists: still under the data root, and unchanged (:func:`check_split_images`);
- ``config.json``: the fields these readers need, of the right type (:func:`read_run_config`).

All of it raises before anything in the run folder is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from .errors import DataError, RunFolderError
from .io import display, read_json, shell_path
from .rundir import RunDir

__all__ = [
    "SplitRows",
    "check_split_images",
    "check_split_record",
    "read_run_config",
    "read_split_rows",
    "split_sha256",
]

SUBSETS = ("train", "val", "test")  # graft.split's, repeated: split.py imports this module
COLUMNS = ("path", "class", "subset", "sha256")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: how many file names an error lists before "and N more"
SHOWN = 5


@dataclass
class SplitRows:
    """The rows of a ``split.csv``, checked, and the file's SHA-256 (of its text)."""

    relpaths: list[str]
    labels: list[int]
    subsets: list[str]
    hashes: list[str]
    groups: list[str]
    sha256: str
    #: the part the user put each image in, for a dataset that came split (graft.layouts);
    #: empty strings otherwise
    given: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        counts = Counter(self.subsets)
        return {s: counts[s] for s in SUBSETS}


def _damaged(path: Path, detail: str) -> RunFolderError:
    return RunFolderError(
        f"{path.name} in {path.parent} is damaged: {detail}; retrain the run or restore the "
        "file from a backup."
    )


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(display(n) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def read_split_rows(path: Path, classes: Sequence[str]) -> SplitRows:
    """Every row of ``split.csv`` checked: all columns present, a relative path listed
    once, a class of the run, a subset among train/val/test and a SHA-256 of 64 hex
    digits. Raises :class:`RunFolderError` naming the first bad line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise RunFolderError(f"{path} is unreadable ({exc}); restore it or retrain.") from exc
    text = raw.decode("utf-8", "surrogateescape")
    index = {c: i for i, c in enumerate(classes)}
    rows = SplitRows([], [], [], [], [], split_sha256(text))
    seen: set[str] = set()
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise _damaged(path, f"it lacks the column(s) {', '.join(missing)}")
        for row in reader:
            line = reader.line_num
            problem = _row_problem(row, index)
            if not problem and row["path"] in seen:
                problem = f"lists {display(row['path'])} a second time"
            if problem:
                raise _damaged(path, f"line {line} {problem}")
            seen.add(row["path"])
            rows.relpaths.append(row["path"])
            rows.labels.append(index[row["class"]])
            rows.subsets.append(row["subset"])
            rows.hashes.append(row["sha256"])
            rows.groups.append(row.get("group") or "")
            rows.given.append(row.get("given_subset") or "")
    except csv.Error as exc:
        raise _damaged(path, f"it is not valid CSV ({exc})") from exc
    if not rows.relpaths:
        raise _damaged(path, "it lists no images")
    return rows


def _row_problem(row: dict[Any, Any], index: dict[str, int]) -> str:
    """What is wrong with one row of split.csv, or ''."""
    if None in row or any(row.get(c) is None for c in COLUMNS):
        return "does not have the 5 columns path,class,subset,sha256,group"
    rel, cls, subset, sha = row["path"], row["class"], row["subset"], row["sha256"]
    posix = PurePosixPath(rel)
    if not rel or posix.is_absolute() or ".." in posix.parts or re.match(r"[A-Za-z]:", rel):
        return f"has the path {display(rel)!r}, not one inside the data folder"
    if cls not in index:
        return f"names the class {display(cls)!r}, not one of the run's ({', '.join(index)})"
    if subset not in SUBSETS:
        return f"has the subset {display(subset)!r} (train, val or test expected)"
    if not _SHA256.fullmatch(sha):
        return f"has a sha256 of {len(sha)} characters (64 hex digits expected)"
    return ""


def split_sha256(text: str) -> str:
    """The digest config.json records of split.csv's text (line endings as written on
    Linux: a text-mode write on Windows turns them into CRLF)."""
    return hashlib.sha256(text.replace("\r\n", "\n").encode("utf-8", "surrogateescape")).hexdigest()


# --------------------------------------------------------------------------- run files


def read_run_config(rundir: RunDir) -> dict[str, Any]:
    """``config.json``, with the fields that locate the images checked (``data_root`` a
    path, ``classes`` unique names): a hand-edited file fails here, naming itself, rather
    than as a KeyError later."""
    config = rundir.read_config()
    problem = ""
    if not isinstance(config, dict):
        problem = "it is not a JSON object"
    elif not isinstance(config.get("data_root"), str) or not config["data_root"]:
        problem = f"data_root is {config.get('data_root')!r}, not a folder"
    else:
        classes = config.get("classes")
        if not (
            isinstance(classes, list)
            and classes
            and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)
        ):
            problem = f"classes is {classes!r}, not a list of unique class names"
    if problem:
        raise _damaged(rundir.config, problem)
    return config


def _recorded(rundir: RunDir, config: dict[str, Any]) -> list[tuple[str, int, dict[str, int]]]:
    """What the run recorded of its split: (file, rows, sizes per subset or {}), from
    config.json (``split_csv``), summary.json (``split``) and audit.json (``images``)."""
    found: list[tuple[str, int, dict[str, int]]] = []
    record = config.get("split_csv")
    if isinstance(record, dict) and _count(record.get("rows")):
        found.append((rundir.config.name, record["rows"], {}))
    if rundir.summary.is_file():
        summary = rundir.read_summary()
        sizes = summary.get("split") if isinstance(summary, dict) else None
        if not (isinstance(sizes, dict) and all(_count(sizes.get(s)) for s in SUBSETS)):
            raise _damaged(rundir.summary, f"its split sizes are {sizes!r}")
        found.append((rundir.summary.name, sum(sizes[s] for s in SUBSETS), sizes))
    if rundir.audit.is_file():
        try:
            audit = read_json(rundir.audit)
        except (OSError, ValueError) as exc:
            raise _damaged(rundir.audit, f"it is not readable JSON ({exc})") from exc
        images = audit.get("images") if isinstance(audit, dict) else None
        if not _count(images):
            raise _damaged(rundir.audit, f"its image count is {images!r}")
        found.append((rundir.audit.name, images, {}))
    return found


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_split_record(rundir: RunDir, rows: SplitRows, config: dict[str, Any]) -> None:
    """Raise :class:`RunFolderError` unless split.csv has as many rows (per subset, where
    recorded) as the run recorded, and the SHA-256 config.json recorded (when it did)."""
    n, sizes = len(rows.subsets), rows.sizes()
    for name, want, want_sizes in _recorded(rundir, config):
        if n != want or (want_sizes and sizes != want_sizes):
            have = f"{n} rows"
            if want_sizes:
                have += f" ({_sizes(sizes)}), the run recorded {want} ({_sizes(want_sizes)})"
            else:
                have += f", the run recorded {want}"
            raise _damaged(rundir.split, f"{have} in {name}")
    record = config.get("split_csv")
    digest = record.get("sha256") if isinstance(record, dict) else None
    if isinstance(digest, str) and digest != rows.sha256:
        raise _damaged(
            rundir.split,
            "its content differs from what config.json recorded (sha256); it was edited "
            "after training",
        )


def _sizes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{s} {sizes[s]}" for s in SUBSETS)


# --------------------------------------------------------------------------- the images


def check_split_images(
    rundir: RunDir,
    root: Path,
    relpaths: Sequence[str],
    hashes: Sequence[str],
    purpose: Literal["resume", "evaluate"],
) -> None:
    """Raise :class:`DataError` unless every image is under ``root`` with the content
    split.csv recorded. Each file is hashed: the bytes are read anyway to train or to be
    evaluated, and a changed image would otherwise be used (or its stale cached features
    reused) without a word."""
    run = rundir.path
    moved = (
        f"`graft train NEW_ROOT --resume {shell_path(run)}`"
        if purpose == "resume"
        else f"`graft evaluate {shell_path(run)} --data-root NEW_ROOT`"
    )
    if not root.is_dir():
        raise DataError(
            f"The data folder recorded in {run}, {display(root)}, no longer exists (moved or "
            f"deleted), so the images of its split cannot be read. Point graft at their new "
            f"location: {moved}."
        )
    missing = [rel for rel in relpaths if not (root / rel).is_file()]
    if missing:
        raise DataError(
            f"The data folder of {run} ({display(root)}) no longer holds {len(missing)} of "
            f"the {len(relpaths)} images its split.csv lists ({_listed(missing)}): the "
            f"folder moved or files were deleted. Point graft at their new location "
            f"({moved}) or restore the files."
        )
    found = _hash_files([root / rel for rel in relpaths])
    unreadable = [f"{rel} ({h[1:]})" for rel, h in zip(relpaths, found, strict=True) if h[0] == "!"]
    if unreadable:
        raise DataError(
            f"{len(unreadable)} images of {run}'s split cannot be read in {display(root)}: "
            f"{_listed(unreadable)}. Fix their permissions or restore them."
        )
    changed = [rel for rel, h, want in zip(relpaths, found, hashes, strict=True) if h != want]
    if changed:
        advice = (
            "The run would go on with other data than it started with: restore the "
            "originals, or start a new run with `graft train ROOT --out DIR`."
            if purpose == "resume"
            else "The held-out test set is no longer the one the run was measured on: "
            "restore the originals, or evaluate on a folder with "
            f"`graft evaluate {shell_path(run)} FOLDER`."
        )
        what = "split" if purpose == "resume" else "held-out test split"
        raise DataError(
            f"{len(changed)} of the {len(relpaths)} images of {run}'s {what} changed since "
            f"it was trained (their content no longer matches the sha256 in split.csv): "
            f"{_listed(changed)}. {advice}"
        )


def _hash_files(paths: Sequence[Path]) -> list[str]:
    """Each file's SHA-256, or ``"!reason"`` when it cannot be read; hashed on a few
    threads (hashlib releases the GIL on large buffers), like a scan reads them."""
    from .files import file_sha256

    def one(path: Path) -> str:
        try:
            return file_sha256(path)
        except OSError as exc:
            return f"!{exc.strerror or exc}"

    if len(paths) < 64:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))
