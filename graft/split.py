"""Splitting a dataset into train / validation / test, in one place.

- :func:`make_split`: stratified by class, shuffled, reproducible from the seed (the seed's
  80/20 split, with validation carved from the training part);
- :func:`make_group_split`: the same, but every group (the frames of one animation, crops of
  one photo) lands on one side only;
- :func:`choose_split`: what a run uses: groups from ``--group-by REGEX`` / ``--groups-csv``,
  or the audit's near-duplicate clusters at the loosest rung of the grouping ladder that
  splits soundly (:func:`check_split_sizes`), else image by image;
- ``split.csv``: :func:`write_split` / :func:`read_split`, and :func:`data_from_split`, the
  images of an existing run exactly as its split lists them (resume, evaluate).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import MIN_PER_CLASS, ScanResult
from .errors import DataError, RunFolderError, SplitError
from .io import atomic_write_text, read_json

__all__ = [
    "SUBSETS",
    "Split",
    "check_split_sizes",
    "choose_split",
    "data_from_split",
    "groups_from_csv",
    "groups_from_pattern",
    "make_group_split",
    "make_split",
    "read_split",
    "write_split",
]

SUBSETS = ("train", "val", "test")


@dataclass
class Split:
    """Which subset each image is in, its group (``None``: split image by image) and a
    sentence saying how the groups were made."""

    subsets: list[str]
    groups: list[str] | None = None
    note: str = ""

    @property
    def grouped(self) -> bool:
        return any(self.groups or [])

    def indices(self, subset: str) -> list[int]:
        return [i for i, s in enumerate(self.subsets) if s == subset]


def make_split(
    labels: Sequence[int], classes: Sequence[str], test_size: float, val_size: float, seed: int
) -> list[str]:
    """Stratified, shuffled train/val/test assignment, reproducible from ``seed``.

    ``test_size`` and ``val_size`` are fractions of the whole dataset. Returns one subset name
    per image, in the order of ``labels``.
    """
    from sklearn.model_selection import train_test_split

    counts = Counter(labels)
    too_small = [f"'{classes[c]}' ({n})" for c, n in sorted(counts.items()) if n < MIN_PER_CLASS]
    if too_small:
        raise SplitError(
            f"Too few images for a stratified train/validation/test split in: "
            f"{', '.join(too_small)}. Each class needs at least {MIN_PER_CLASS} images "
            "(20 or more gives meaningful numbers). Add images or remove those classes."
        )
    n = len(labels)
    n_classes = len(counts)
    n_test = max(n_classes, math.ceil(test_size * n))
    n_val = max(n_classes, math.ceil(val_size * n))
    if n - n_test - n_val < n_classes:
        raise SplitError(
            f"{n} images are too few to hold out {n_test} for testing and {n_val} for validation "
            f"across {n_classes} classes. Add images, or lower --test-size / --val-size."
        )
    index = np.arange(n)
    y = np.asarray(labels)
    try:
        rest, test = train_test_split(
            index, test_size=n_test, stratify=y, random_state=seed, shuffle=True
        )
        train, val = train_test_split(
            rest, test_size=n_val, stratify=y[rest], random_state=seed, shuffle=True
        )
    except ValueError as exc:
        raise SplitError(f"Could not split the dataset stratified by class: {exc}") from exc
    subset = np.empty(n, dtype=object)
    subset[train], subset[val], subset[test] = "train", "val", "test"
    return [str(s) for s in subset]


def make_group_split(
    labels: Sequence[int],
    groups: Sequence[str],
    classes: Sequence[str],
    test_size: float,
    val_size: float,
    seed: int,
) -> list[str]:
    """Like :func:`make_split`, but every group (e.g. the frames of one animation) lands on
    one side only; classes stay as balanced across the subsets as the groups allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    g = np.asarray(groups)
    n_groups = len(set(groups))
    k_test = max(2, round(1 / test_size))
    k_val = max(2, round((1 - test_size) / val_size))
    if n_groups < k_test + 1:
        raise SplitError(
            f"Only {n_groups} groups: too few to hold out whole groups for validation and "
            "testing. Use a finer --group-by pattern, or more data."
        )
    index = np.arange(len(y))
    try:
        rest, test = next(
            StratifiedGroupKFold(k_test, shuffle=True, random_state=seed).split(index, y, g)
        )
        train, val = next(
            StratifiedGroupKFold(k_val, shuffle=True, random_state=seed).split(
                rest, y[rest], g[rest]
            )
        )
    except ValueError as exc:
        raise SplitError(f"Could not split the dataset by group: {exc}") from exc
    val = rest[val]
    train = rest[train]
    missing = [classes[c] for c in sorted(set(y.tolist())) if c not in set(y[train].tolist())]
    if missing:
        raise SplitError(
            f"Splitting by group left no training images of: {', '.join(missing)}. Each "
            "class needs images from at least 3 groups (sources)."
        )
    subset = np.empty(len(y), dtype=object)
    subset[train], subset[val], subset[test] = "train", "val", "test"
    return [str(v) for v in subset]


def check_split_sizes(
    subsets: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    test_size: float,
    val_size: float,
) -> None:
    """Raise :class:`SplitError` unless validation and test each hold between half and 1.5
    times their share, and all but a tenth of the classes keep at least half their share of
    training images. Coarse groups can put a fifth of the data, or most of one class, in one
    cluster, and a split that holds it out measures little and trains on less."""
    n = len(subsets)
    for name, want in (("test", test_size), ("val", val_size)):
        got = sum(s == name for s in subsets) / max(1, n)
        if not (want / 2 <= got <= want * 1.5):
            raise SplitError(
                f"the groups are too coarse: {name} would hold {got:.0%} of the images, "
                f"against {want:.0%} asked for"
            )
    floor = (1 - test_size - val_size) / 2
    per_class = Counter(labels)
    in_train = Counter(c for c, s in zip(labels, subsets, strict=True) if s == "train")
    short = [c for c in sorted(per_class) if in_train[c] < floor * per_class[c]]
    # Among many classes a few whose one animation lands in test are the price of honesty;
    # beyond a tenth of them the split mostly measures how the clusters fell.
    if len(short) > len(per_class) // 10:
        c = short[0]
        raise SplitError(
            f"the groups are too coarse: {len(short)} of {len(per_class)} classes would keep "
            f"under {floor:.0%} of their images for training (e.g. '{classes[c]}': "
            f"{in_train[c]} of {per_class[c]})"
        )


def groups_from_pattern(relpaths: Sequence[str], pattern: str) -> tuple[list[str], int]:
    """The group of each file from a regex on its path relative to the dataset root: the
    first capture group, or the whole match. Unmatched files are groups of their own;
    returns the groups and how many files did not match."""
    regex = re.compile(pattern)
    out, unmatched = [], 0
    for rel in relpaths:
        m = regex.search(rel)
        if m is None:
            unmatched += 1
            out.append(f"file:{rel}")
        else:
            out.append(m.group(1) if regex.groups else m.group(0))
    return out, unmatched


def groups_from_csv(path: Path, relpaths: Sequence[str]) -> tuple[list[str], int]:
    """Groups from a CSV with columns ``path`` (relative to the dataset root) and ``group``."""
    mapping: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "group"} <= set(reader.fieldnames):
            raise DataError(
                f"{path} needs the columns 'path' and 'group' (found {reader.fieldnames})."
            )
        for row in reader:
            mapping[row["path"].strip()] = row["group"].strip()
    out = [mapping.get(rel, f"file:{rel}") for rel in relpaths]
    return out, sum(rel not in mapping for rel in relpaths)


def write_split(
    path: Path, data: ScanResult, subsets: Sequence[str], groups: Sequence[str] | None = None
) -> None:
    groups = groups or [""] * len(subsets)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "subset", "sha256", "group"])
    rows = zip(data.paths, data.labels, subsets, data.sha256, groups, strict=True)
    for p, label, subset, sha, group in rows:
        writer.writerow([data.relpath(p), data.classes[label], subset, sha, group])
    atomic_write_text(path, buf.getvalue())


def read_split(
    path: Path, root: Path, classes: Sequence[str]
) -> tuple[list[Path], list[int], list[str]]:
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, subsets = [], [], []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for row in csv.DictReader(fh):
            paths.append(root / row["path"])
            labels.append(index[row["class"]])
            subsets.append(row["subset"])
    return paths, labels, subsets


# --------------------------------------------------------------------------- a run's split


def choose_split(config: Any, data: ScanResult, report: Any, reporter: Any) -> Split:
    """The split of a new run: by the groups the user named, by the audit's near-duplicate
    clusters (``report``, an :class:`graft.audit.AuditReport`), or image by image."""
    if _groups_by_clusters(config, report):
        return _cluster_split(config, data, report, reporter)
    groups, note = _resolve_groups(config, data)
    if groups is not None:
        subsets = make_group_split(
            data.labels, groups, data.classes, config.test_size, config.val_size, config.seed
        )
        return Split(subsets, groups, note)
    subsets = make_split(data.labels, data.classes, config.test_size, config.val_size, config.seed)
    return Split(subsets)


def _groups_by_clusters(config: Any, report: Any) -> bool:
    """Whether the split keeps near-duplicate clusters apart: asked for with --group-by auto,
    or by default when the audit found near-copies (and no other grouping was named)."""
    if config.groups_csv:
        return False
    return config.group_by == "auto" or (config.group_by is None and report.n_clusters_multi > 0)


def _cluster_split(config: Any, data: ScanResult, report: Any, reporter: Any) -> Split:
    """Keep clusters of similar images on one side, at the loosest rung of the grouping
    ladder whose clusters split soundly; by default, fall back to an image-by-image split
    (with a warning) when none does."""
    from .audit import grouping_ladder

    how = "--group-by auto" if config.group_by else "the default; --group-by none turns it off"
    tried = []
    for t in grouping_ladder(config.group_threshold, config.dup_threshold):
        clusters = report.clusters_at(t)
        groups = [f"cluster-{c}" for c in clusters]
        try:
            subsets = make_group_split(
                data.labels, groups, data.classes, config.test_size, config.val_size, config.seed
            )
            check_split_sizes(subsets, data.labels, data.classes, config.test_size, config.val_size)
        except SplitError as exc:
            tried.append(f"at {t:g}: {str(exc).rstrip('.')}")
            continue
        ids, counts = np.unique(clusters, return_counts=True)
        note = (
            f"Split by group: the {int((counts > 1).sum())} clusters of similar images "
            f"(cosine >= {t:g}) are each kept on one side ({how}); {len(ids)} groups."
        )
        if tried:
            note += " Looser similarity was tried first: " + "; ".join(tried) + "."
        return Split(subsets, groups, note)
    reason = "; ".join(tried)
    if config.group_by == "auto":  # asked for by name: its failure is the user's to see
        raise SplitError(f"Could not keep near-duplicate clusters apart ({reason}).")
    reporter.warn(
        f"Near-duplicate clusters could not be kept on one side ({reason}); splitting image by "
        "image instead, so validation and test will overstate accuracy."
    )
    subsets = make_split(data.labels, data.classes, config.test_size, config.val_size, config.seed)
    return Split(subsets)


def _resolve_groups(config: Any, data: ScanResult) -> tuple[list[str] | None, str]:
    """The group of each image, from --group-by REGEX / --groups-csv, and a sentence saying
    so (clusters of the audit are :func:`_cluster_split`'s)."""
    rel = [data.relpath(p) for p in data.paths]
    if config.groups_csv:
        groups, unmatched = groups_from_csv(Path(config.groups_csv), rel)
        source = f"groups from {config.groups_csv}"
    elif config.group_by and config.group_by not in ("auto", "none"):
        groups, unmatched = groups_from_pattern(rel, config.group_by)
        source = f"groups from --group-by {config.group_by!r}"
    else:
        return None, ""
    n = len(set(groups))
    note = f"Split by group: {source}; {n} groups"
    if unmatched:
        note += f" ({unmatched} files matched no group and form groups of their own)"
    return groups, note + "."


def data_from_split(run: Path, data_root: str | Path | None) -> tuple[ScanResult, Split]:
    """The images of an existing run, exactly as its split.csv lists them."""
    from .rundir import RunDir

    rundir = RunDir(run)
    if not rundir.config.is_file() or not rundir.split.is_file():
        raise RunFolderError(
            f"Nothing to resume in {run}: it has no config.json/split.csv. "
            "Start a new run with `graft train ROOT --out DIR`."
        )
    saved = read_json(rundir.config)
    root = Path(data_root or saved["data_root"]).resolve()
    classes = list(saved["classes"])
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, subsets, hashes, groups = [], [], [], [], []
    with open(rundir.split, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for row in csv.DictReader(fh):
            paths.append(root / row["path"])
            labels.append(index[row["class"]])
            subsets.append(row["subset"])
            hashes.append(row["sha256"])
            groups.append(row.get("group", ""))
    return ScanResult(root, classes, paths, labels, hashes), Split(subsets, groups)
