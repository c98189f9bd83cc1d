"""Splitting a dataset into train / validation / test, in one place.

- :func:`make_split`: stratified by class, shuffled, reproducible from the seed (the seed's
  80/20 split, with validation carved from the training part);
- :func:`make_group_split`: the same, but every group (the frames of one animation, crops of
  one photo) lands on one side only;
- :func:`choose_split`: what a run uses: groups from ``--group-by REGEX`` / ``--groups-csv``,
  or the audit's near-duplicate clusters at the loosest rung of the grouping ladder that
  splits soundly (:func:`check_split_sizes`), else image by image; a dataset that came
  split (graft.layouts) keeps the user's split, its missing parts carved the same way;
- ``split.csv``: :func:`write_split` / :func:`read_split`, and :func:`data_from_split`, the
  images of an existing run exactly as its split lists them (resume, evaluate).
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .data import MIN_PER_CLASS, ScanResult
from .errors import RunFolderError, SplitError
from .io import atomic_write_text
from .layouts import groups_from_csv, groups_from_pattern, named_groups, say_ignored

__all__ = [
    "SUBSETS",
    "Split",
    "check_split_sizes",
    "choose_split",
    "class_shares",
    "data_from_split",
    "groups_from_csv",
    "groups_from_pattern",
    "make_group_split",
    "make_split",
    "read_split",
    "share_problems",
    "split_new_run",
    "write_split",
]

SUBSETS = ("train", "val", "test")
#: each class's share of validation and of test stays within these multiples of the share
#: asked (with one image of slack), unless its groups make that impossible (then reported)
SHARE_BOUNDS = (0.75, 1.25)


@dataclass
class Split:
    """Which subset each image is in, its group (``None``: split image by image) and a
    sentence saying how the groups were made."""

    subsets: list[str]
    groups: list[str] | None = None
    note: str = ""
    #: classes whose share of validation or test is outside SHARE_BOUNDS, and why
    problems: list[str] = field(default_factory=list)
    #: the user's own subset of each image, when the dataset came split (graft.layouts)
    given: list[str] | None = None
    #: who made which part: {"layout": ..., "by_user": [subsets], "by_graft": [subsets]}
    source: dict[str, Any] = field(default_factory=dict)

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


def class_targets(n: int, test_size: float, val_size: float) -> dict[str, int]:
    """How many of a class's ``n`` images each subset should hold (at least one each)."""
    test, val = max(1, round(test_size * n)), max(1, round(val_size * n))
    return {"train": n - test - val, "val": val, "test": test}


def _share_bounds(n: int, share: float) -> tuple[float, float]:
    """The images of a class (of ``n``) a subset asked for ``share`` may hold: within
    SHARE_BOUNDS of the share, with one image of slack for small classes."""
    want = share * n
    lo, hi = SHARE_BOUNDS
    return min(lo * want, want - 1), max(hi * want, want + 1)


def make_group_split(
    labels: Sequence[int],
    groups: Sequence[str],
    classes: Sequence[str],
    test_size: float,
    val_size: float,
    seed: int,
    attempts: int = 16,
) -> list[str]:
    """Like :func:`make_split`, but every group (e.g. the frames of one animation) lands on
    one side only, and each class's shares come as close to the asked ones as its groups
    allow.

    Groups are placed largest first (ties in a seeded random order), each on a side drawn
    with probability proportional to what that side still lacks of the group's classes,
    among the sides it fits without passing a class's upper bound (:data:`SHARE_BOUNDS`).
    Single images come last and fill the gaps exactly, so a folder of mostly ungrouped
    images is split as stratified as :func:`make_split` would. When coarse groups leave a
    class outside its bounds, up to ``attempts`` seeded draws are made and the closest kept.
    """
    y = np.asarray(labels)
    n_groups = len(set(groups))
    if n_groups < 3:
        raise SplitError(
            f"Only {n_groups} groups: too few to hold out whole groups for validation and "
            "testing. Use a finer --group-by pattern, or more data."
        )
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    counts = {g: Counter(y[m].tolist()) for g, m in members.items()}
    per_class = Counter(y.tolist())
    shares = {"train": 1 - test_size - val_size, "val": val_size, "test": test_size}
    target = {c: class_targets(n, test_size, val_size) for c, n in per_class.items()}
    upper = {
        c: {s: n if s == "train" else _share_bounds(n, shares[s])[1] for s in SUBSETS}
        for c, n in per_class.items()
    }
    best: tuple[float, list[str]] | None = None
    for attempt in range(attempts):
        rng = np.random.default_rng(seed if attempt == 0 else [seed, attempt])
        have = _place_groups(members, counts, target, upper, rng)
        off = _off_bounds(have, per_class, test_size, val_size)
        if best is None or off < best[0]:
            subset = np.empty(len(y), dtype=object)
            for g, side in have["_side"].items():  # type: ignore[union-attr]
                subset[members[g]] = side
            best = (off, [str(v) for v in subset])
        if off == 0:
            break
    assert best is not None
    split = best[1]
    in_train = Counter(c for c, s in zip(y.tolist(), split, strict=True) if s == "train")
    missing = [classes[c] for c in sorted(per_class) if in_train[c] == 0]
    if missing:
        raise SplitError(
            f"Splitting by group left no training images of: {', '.join(missing)}. Each "
            "class needs images from at least 3 groups (sources)."
        )
    return split


def _off_bounds(
    have: dict[Any, dict[str, int]], per_class: Counter[int], test_size: float, val_size: float
) -> float:
    """How far the classes' validation and test counts lie outside their bounds, summed
    relative to what was asked (0: every class within bounds)."""
    off = 0.0
    for c, n in per_class.items():
        for s, share in (("val", val_size), ("test", test_size)):
            lo, hi = _share_bounds(n, share)
            off += max(0.0, lo - have[c][s], have[c][s] - hi) / max(1.0, share * n)
    return off


def _place_groups(
    members: dict[str, list[int]],
    counts: dict[str, Counter[int]],
    target: dict[int, dict[str, int]],
    upper: dict[int, dict[str, float]],
    rng: np.random.Generator,
) -> dict[Any, Any]:
    """One draw of :func:`make_group_split`: per class, how many images each side got, and
    under ``"_side"`` the side of each group."""
    names = list(members)
    order = [names[k] for k in rng.permutation(len(names))]
    order.sort(key=lambda g: -len(members[g]))  # stable: ties stay in random order
    have: dict[Any, Any] = {c: dict.fromkeys(SUBSETS, 0) for c in target}
    sides: dict[str, str] = {}
    for g in order:
        lack = np.array(
            [
                sum(n * max(0, target[c][s] - have[c][s]) for c, n in counts[g].items())
                for s in SUBSETS
            ],
            dtype=float,
        )
        # A side takes the group when every class of it stays within its upper bound, or
        # at least ends closer to its target than without it (a class of three big groups
        # is better off with one of them in test, even if that overshoots, than with none).
        fits = np.array(
            [
                all(
                    have[c][s] + n <= upper[c][s]
                    or abs(have[c][s] + n - target[c][s]) < abs(have[c][s] - target[c][s])
                    for c, n in counts[g].items()
                )
                for s in SUBSETS
            ]
        )
        weight = lack * fits
        if weight.sum() == 0:  # nowhere it fits and is wanted: where it is lacked most
            weight = lack if lack.sum() > 0 else np.array([1.0, 0.0, 0.0])
        side = SUBSETS[int(rng.choice(3, p=weight / weight.sum()))]
        sides[g] = side
        for c, n in counts[g].items():
            have[c][side] += n
    have["_side"] = sides
    return have


def class_shares(
    subsets: Sequence[str], labels: Sequence[int], classes: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Each class's share of its images in train, validation and test."""
    total = Counter(labels)
    inside = Counter(zip(labels, subsets, strict=True))
    return {classes[c]: {s: inside[(c, s)] / total[c] for s in SUBSETS} for c in sorted(total)}


def share_problems(
    subsets: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    test_size: float,
    val_size: float,
    groups: Sequence[str] | None = None,
    check: Sequence[str] = ("val", "test"),
) -> list[str]:
    """A sentence for each class whose share of validation or test (those in ``check``)
    lies outside :data:`SHARE_BOUNDS` of the share asked (one image of slack), saying why
    when its groups are the reason."""
    total = Counter(labels)
    inside = Counter(zip(labels, subsets, strict=True))
    out = []
    for c in sorted(total):
        bad = []
        for s, share in (("val", val_size), ("test", test_size)):
            lo, hi = _share_bounds(total[c], share)
            if s in check and not lo <= inside[(c, s)] <= hi:
                got = inside[(c, s)] / total[c]
                bad.append(f"{s} {got:.0%} (asked {share:.0%})")
        if bad:
            why = ""
            if groups is not None:
                sizes = Counter(g for g, y in zip(groups, labels, strict=True) if y == c)
                why = (
                    f": its {total[c]} images form {len(sizes)} groups, the largest of "
                    f"{max(sizes.values())}"
                )
            out.append(f"'{classes[c]}' has {', '.join(bad)}{why}")
    return out


def check_split_sizes(
    subsets: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    test_size: float,
    val_size: float,
) -> None:
    """Raise :class:`SplitError` unless validation and test each hold between half and 1.5
    times their share of all images: coarser groups measure little and train on less."""
    n = len(subsets)
    for name, want in (("test", test_size), ("val", val_size)):
        got = sum(s == name for s in subsets) / max(1, n)
        if not (want / 2 <= got <= want * 1.5):
            raise SplitError(
                f"the groups are too coarse: {name} would hold {got:.0%} of the images, "
                f"against {want:.0%} asked for"
            )


def write_split(
    path: Path, data: ScanResult, subsets: Sequence[str], groups: Sequence[str] | None = None
) -> dict[str, Any]:
    """Write ``split.csv``; returns what config.json should record of it (``rows``, and the
    file's ``sha256``), so that a truncated or edited file is told from the one written.
    A dataset that came split adds the column ``given_subset``: the part the user put each
    image in (a validation image carved from the user's training images says ``train``)."""
    groups = groups or [""] * len(subsets)
    given = data.given
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "subset", "sha256", "group"] + ["given_subset"] * bool(given))
    rows = zip(data.paths, data.labels, subsets, data.sha256, groups, strict=True)
    for i, (p, label, subset, sha, group) in enumerate(rows):
        extra = [given[i]] if given else []
        writer.writerow([data.relpath(p), data.classes[label], subset, sha, group, *extra])
    text = buf.getvalue()
    atomic_write_text(path, text)
    from .integrity import split_sha256

    return {"rows": len(subsets), "sha256": split_sha256(text)}


def read_split(
    path: Path, root: Path, classes: Sequence[str]
) -> tuple[list[Path], list[int], list[str]]:
    """The images, labels and subsets ``split.csv`` lists, every row checked
    (:func:`graft.integrity.read_split_rows`)."""
    from .integrity import read_split_rows

    rows = read_split_rows(path, classes)
    return [root / r for r in rows.relpaths], rows.labels, rows.subsets


# --------------------------------------------------------------------------- a run's split


def split_new_run(
    config: Any, data: ScanResult, embeddings: np.ndarray, reporter: Any
) -> tuple[Split, Any]:
    """The split of a new run and the duplicate audit it rests on, the same for training,
    ``--backbone auto`` and lr-find: none learns from an image another holds out."""
    from .audit import audit_for_split

    report = audit_for_split(config, data, embeddings)
    return choose_split(config, data, report, reporter, embeddings), report


def choose_split(
    config: Any,
    data: ScanResult,
    report: Any,
    reporter: Any,
    embeddings: np.ndarray | None = None,
) -> Split:
    """The split of a new run: by the groups the user named, by the audit's near-duplicate
    clusters (``report``, an :class:`graft.audit.AuditReport`; ``embeddings``, the features
    it compared, let look-alike clusters be told from near-copies), or image by image. A
    dataset that came split keeps its split (:func:`_user_split`)."""
    if getattr(data, "given", None) is not None:
        return _user_split(config, data, report, reporter, embeddings)
    if _groups_by_clusters(config, report):
        split = _cluster_split(config, data, report, reporter, embeddings)
    else:
        groups, note = named_groups(config, data)
        if groups is not None:
            subsets = make_group_split(
                data.labels, groups, data.classes, config.test_size, config.val_size, config.seed
            )
            split = Split(subsets, groups, note)
        else:
            subsets = make_split(
                data.labels, data.classes, config.test_size, config.val_size, config.seed
            )
            split = Split(subsets)
    split.problems = share_problems(
        split.subsets, data.labels, data.classes, config.test_size, config.val_size, split.groups
    )
    layout = getattr(data, "layout", "class folders")
    split.source = {"layout": layout, "by_user": [], "by_graft": list(SUBSETS)}
    return split


def _user_split(
    config: Any, data: ScanResult, report: Any, reporter: Any, embeddings: np.ndarray | None
) -> Split:
    """The split of a dataset that came split (``data.given``; graft.layouts), used as
    given. A part it lacks (validation, test) is carved from its training images as a
    folder would be split (:func:`choose_split`: stratified, grouped by the user's groups
    or the audit's near-copy clusters), taking --val-size / --test-size of them."""
    given = list(data.given or [])
    count = Counter(given)
    missing = [s for s in ("val", "test") if not count[s]]
    who = "the folder's own split" if data.layout == "split folders" else "the CSV's split column"
    say_ignored(config, reporter, missing, who)
    by_user = sorted(count, key=SUBSETS.index)
    source = {"layout": data.layout, "by_user": by_user, "by_graft": missing}
    if not missing:
        note = (
            f"Split: {who}, used as given (train {count['train']} / validation "
            f"{count['val']} / test {count['test']})."
        )
        return Split(given, None, note, given=given, source=source)
    train = [i for i, s in enumerate(given) if s == "train"]
    part = data.subset(train)
    part.given = None  # now a folder of class folders to split
    words = " and ".join({"val": "validation", "test": "test"}[s] for s in missing)
    try:
        sub_embeddings = embeddings[train] if embeddings is not None else None
        carved = choose_split(config, part, report.subset(train), reporter, sub_embeddings)
    except SplitError as exc:
        raise SplitError(f"Carving {words} from the training images of {who}: {exc}") from exc
    subsets, groups = list(given), [""] * len(given) if carved.groups else None
    for k, i in enumerate(train):
        # only the missing parts are taken: what else the carving held out stays in train
        subsets[i] = carved.subsets[k] if carved.subsets[k] in missing else "train"
        if groups is not None and carved.groups is not None:
            groups[i] = carved.groups[k]
    shares = " and ".join(
        f"{config.val_size if s == 'val' else config.test_size:.0%}" for s in missing
    )
    note = (
        f"Split: {who}; {words} carved from its {len(train)} training images ({shares} of "
        f"them). {carved.note or 'Stratified, image by image.'}"
    )
    split = Split(subsets, groups, note, given=given, source=source)
    split.problems = split_problems(split, data, config)
    return split


def split_problems(split: Split, data: ScanResult, config: Any) -> list[str]:
    """:func:`share_problems` of a run's split; for a dataset that came split, only of the
    parts graft carved from the user's training images, against the shares asked of them."""
    pick = range(len(split.subsets))
    if split.given is not None:
        pick = [i for i, g in enumerate(split.given) if g == "train"]
    subsets = [split.subsets[i] for i in pick]
    groups = [split.groups[i] for i in pick] if split.grouped and split.groups else None
    check = {"val", "test"} if split.given is None else set(subsets) - {"train"}
    labels = [data.labels[i] for i in pick]
    return share_problems(
        subsets, labels, data.classes, config.test_size, config.val_size, groups, sorted(check)
    )


def _groups_by_clusters(config: Any, report: Any) -> bool:
    """Whether the split keeps near-duplicate clusters apart: asked for with --group-by auto,
    or by default when the audit found near-copies (and no other grouping was named)."""
    if config.groups_csv:
        return False
    return config.group_by == "auto" or (config.group_by is None and report.n_clusters_multi > 0)


def _cluster_split(
    config: Any,
    data: ScanResult,
    report: Any,
    reporter: Any,
    embeddings: np.ndarray | None = None,
) -> Split:
    """Keep clusters of near-copies on one side. Each rung of the grouping ladder is tried,
    loosest first, after breaking up its clusters of look-alikes (:func:`split_lookalikes`);
    the first whose split keeps every class within its share bounds is used, else the one
    that comes closest. By default, fall back to an image-by-image split (with a warning)
    when no rung's groups can be split at all."""
    from .audit import grouping_ladder, split_lookalikes

    how = "--group-by auto" if config.group_by else "the default; --group-by none turns it off"
    tried, found = [], []
    rungs = grouping_ladder(config.group_threshold, config.dup_threshold)
    copies = report.images_in_clusters / max(1, report.n)
    if copies < SEQUENCE_SHARE:
        # Near-copies are rare: the images are mostly distinct pictures, and what a looser
        # similarity would add is look-alikes, not frames of one sequence.
        rungs = [config.dup_threshold]
    floor = np.asarray(report.clusters_at(config.dup_threshold))
    for t in rungs:
        clusters, broken = np.asarray(report.clusters_at(t)), 0
        if embeddings is not None and t < config.dup_threshold:
            clusters, broken = split_lookalikes(
                clusters, embeddings, data.labels, t, floor, config.dup_threshold
            )
        groups = [f"cluster-{c}" for c in clusters]
        try:
            subsets = make_group_split(
                data.labels, groups, data.classes, config.test_size, config.val_size, config.seed
            )
            check_split_sizes(subsets, data.labels, data.classes, config.test_size, config.val_size)
        except SplitError as exc:
            tried.append(f"at {t:g}: {str(exc).rstrip('.')}")
            continue
        problems = share_problems(
            subsets, data.labels, data.classes, config.test_size, config.val_size, groups
        )
        have: dict[Any, dict[str, int]] = {c: dict.fromkeys(SUBSETS, 0) for c in set(data.labels)}
        for c, side in zip(data.labels, subsets, strict=True):
            have[c][side] += 1
        off = _off_bounds(have, Counter(data.labels), config.test_size, config.val_size)
        found.append((off, t, subsets, groups, broken))
        if not problems:
            break
        tried.append(
            f"at {t:g}: {len(problems)} "
            + ("classes outside their" if len(problems) > 1 else "class outside its")
            + " share bounds"
        )
    if found:
        # the rung closest to the bounds (the loosest of equals)
        _, t, subsets, groups, broken = min(found, key=lambda f: f[0])
        ids, counts = np.unique(groups, return_counts=True)
        whose = f"{report.clusters_of} " if report.clusters_of else ""
        note = (
            f"Split by group: the {int((counts > 1).sum())} clusters of near-copies {whose}"
            f"(cosine >= {t:g}) are each kept on one side ({how}); {len(ids)} groups."
        )
        if broken:
            note += (
                f" {broken} clusters of look-alikes (no closer to each other than their class "
                "is, or most of it) were split finer: they are classes, not near-copies."
            )
        tried = [x for x in tried if not x.startswith(f"at {t:g}:")]
        if tried:
            note += " Also tried: " + "; ".join(tried) + "."
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


#: Looser rungs of the grouping ladder are tried only when at least this share of the images
#: have near-copies at the audit's threshold: sequences (animation frames, bursts), whose
#: members drift apart. Measured (BENCHMARKS.md): sprites 96%, digits 5%, Fashion-MNIST 1%.
SEQUENCE_SHARE = 0.25


def data_from_split(
    run: Path,
    data_root: str | Path | None,
    subsets: Sequence[str] = SUBSETS,
    purpose: Literal["resume", "evaluate"] = "resume",
) -> tuple[ScanResult, Split]:
    """The images of an existing run in ``subsets``, exactly as its split.csv lists them.

    Everything is checked before anything in the run folder is written (graft.integrity):
    the rows and their number against what the run recorded, then that the images are
    still there and unchanged. ``purpose`` chooses the advice of those errors (how to point
    graft at a data folder that moved)."""
    from .integrity import check_split_images, check_split_record, read_run_config, read_split_rows
    from .rundir import RunDir

    rundir = RunDir(run)
    if not rundir.config.is_file() or not rundir.split.is_file():
        raise RunFolderError(
            f"Nothing to resume in {run}: it has no config.json/split.csv. "
            "Start a new run with `graft train ROOT --out DIR`."
        )
    config = read_run_config(rundir)
    rows = read_split_rows(rundir.split, config["classes"])
    check_split_record(rundir, rows, config)
    root = Path(data_root or config["data_root"]).expanduser().resolve()
    keep = [i for i, s in enumerate(rows.subsets) if s in subsets]
    check_split_images(
        rundir, root, [rows.relpaths[i] for i in keep], [rows.hashes[i] for i in keep], purpose
    )
    given = rows.given  # a dataset that came split says where the user put each image
    data = ScanResult(
        root,
        list(config["classes"]),
        [root / rows.relpaths[i] for i in keep],
        [rows.labels[i] for i in keep],
        [rows.hashes[i] for i in keep],
        given=[given[i] for i in keep] if any(given) else None,
    )
    subsets, groups = [rows.subsets[i] for i in keep], [rows.groups[i] for i in keep]
    return data, Split(subsets, groups, given=data.given)
