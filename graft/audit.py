"""Duplicate and leakage audit: the check that makes validation numbers mean something.

When neighbouring frames of one animation, or near-copies of one picture, fall on both sides
of a random split, the model is "validated" on images it has in effect already seen, and
validation accuracy says nothing about new images. The audit finds:

- exact duplicates (identical file content, by SHA-256);
- exact duplicates filed under different classes (almost always a labelling error);
- near-duplicates: pairs whose backbone embeddings have cosine similarity >= a threshold;
- pairs that straddle the split (one image in train, its near-copy in validation or test),
  whether graft made the split or the user did (ROOT/train|val|test/, a labels CSV's split
  column: graft.layouts); the user's own are named with examples and how to fix them.

Near-duplicate pairs are joined into clusters (connected components); ``--group-by auto``
keeps each cluster on one side of the split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

#: Cosine similarity of pooled ImageNet features above which two images count as near-copies.
#: Consecutive animation frames and re-encoded copies score above it; different photos of
#: one class rarely do.
DEFAULT_THRESHOLD = 0.95


def grouping_ladder(loosest: float, threshold: float, step: float = 0.025) -> list[float]:
    """The thresholds a default split tries, loosest (most honest) first, ending at the
    audit's own: on some data a loose threshold chains nearly everything into a few clusters
    that cannot be split, and the next rung up still keeps near-copies together."""
    rungs = []
    t = loosest
    while t < threshold - 1e-9:
        rungs.append(round(t, 4))
        t += step
    return [*rungs, threshold]


class Pairs(Sequence[tuple[int, int, float]]):
    """Image index pairs ``(i, j, similarity)`` held as three numpy arrays: a million pairs
    take 24 MB instead of the ~150 MB of Python tuples. Indexing gives a tuple, slicing and
    :meth:`where` give ``Pairs``."""

    def __init__(self, a: Any = (), b: Any = (), s: Any = ()):
        self.a = np.asarray(a, dtype=np.int64)
        self.b = np.asarray(b, dtype=np.int64)
        self.s = np.asarray(s, dtype=np.float64)

    @classmethod
    def concat(cls, parts: Sequence[Pairs]) -> Pairs:
        if not parts:
            return cls()
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in "abs"))

    def where(self, mask: np.ndarray) -> Pairs:
        return Pairs(self.a[mask], self.b[mask], self.s[mask])

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return self.where(k)
        return int(self.a[k]), int(self.b[k]), float(self.s[k])

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        return zip(self.a.tolist(), self.b.tolist(), self.s.tolist(), strict=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Pairs({list(self)[:3]}{'...' if len(self) > 3 else ''}, n={len(self)})"


@dataclass
class AuditReport:
    n: int
    threshold: float
    exact_groups: list[list[int]] = field(default_factory=list)
    cross_class: list[tuple[int, int]] = field(default_factory=list)
    near_pairs: Pairs = field(default_factory=Pairs)
    #: all near-duplicate pairs found; ``near_pairs`` keeps at most MAX_PAIRS of them
    near_pairs_total: int = 0
    clusters: list[int] = field(default_factory=list)  # cluster id per image
    #: cluster id per image at looser thresholds (for grouping the split), by threshold
    looser: dict[float, list[int]] = field(default_factory=dict)
    straddling: Pairs = field(default_factory=Pairs)
    #: the pairs of ``straddling`` on two sides of the split the user made (graft.layouts)
    straddling_given: Pairs = field(default_factory=Pairs)
    clusters_of: str = ""  # whose near-copies ``clusters`` are, when not one embedding's

    @property
    def n_clusters_multi(self) -> int:
        _, counts = np.unique(self.clusters, return_counts=True)
        return int((counts > 1).sum())

    @property
    def images_in_clusters(self) -> int:
        _, counts = np.unique(self.clusters, return_counts=True)
        return int(counts[counts > 1].sum())

    def clusters_at(self, threshold: float) -> list[int]:
        """Cluster id per image when pairs at or above ``threshold`` join clusters (the
        audit's own threshold, or one of the looser ones it was asked for)."""
        return self.clusters if threshold >= self.threshold else self.looser[threshold]

    def subset(self, indices: Sequence[int]) -> AuditReport:
        """The clusters among the images at ``indices`` (numbered anew, each by its first
        image there), at every threshold: what splitting those images needs (carving
        validation from a user's training images). Pairs are not carried over."""
        pick = np.asarray(indices, dtype=np.int64)

        def renumber(ids: Sequence[int]) -> list[int]:
            _, first, inverse = np.unique(
                np.asarray(ids)[pick], return_index=True, return_inverse=True
            )
            return first[inverse].tolist()

        return AuditReport(
            n=len(pick),
            threshold=self.threshold,
            clusters=renumber(self.clusters) if self.clusters else [],
            looser={t: renumber(ids) for t, ids in self.looser.items()},
        )

    def to_dict(
        self, paths: Sequence[Path] | None = None, root: Path | None = None, limit: int = 20
    ) -> dict[str, Any]:
        def name(i: int) -> str:
            if paths is None:
                return str(i)
            p = Path(paths[i])
            return p.relative_to(root).as_posix() if root and p.is_relative_to(root) else str(p)

        return {
            "images": self.n,
            "threshold": self.threshold,
            "exact_duplicate_groups": len(self.exact_groups),
            "exact_duplicate_files": sum(len(g) - 1 for g in self.exact_groups),
            "cross_class_duplicates": [[name(a), name(b)] for a, b in self.cross_class[:limit]],
            "near_duplicate_pairs": max(self.near_pairs_total, len(self.near_pairs)),
            "pairs_kept_for_split_check": len(self.near_pairs),
            "near_duplicate_clusters": self.n_clusters_multi,
            "images_in_clusters": self.images_in_clusters,
            "straddling_pairs": len(self.straddling),
            "straddling_examples": [
                [name(a), name(b), round(s, 4)] for a, b, s in self.straddling[:limit]
            ],
            "straddling_given_split": len(self.straddling_given),
        }


#: Near-duplicate pairs kept for the split check and examples (all are counted and
#: clustered): a folder of near-identical images has O(n^2) pairs.
MAX_PAIRS = 1_000_000
#: Similarity entries computed at once: bounds the search's memory whatever n is.
BLOCK = 1 << 22


def near_duplicate_pairs(
    embeddings: np.ndarray,
    threshold: float,
    keep: int = MAX_PAIRS,
    clusters: np.ndarray | None = None,
    looser: dict[float, np.ndarray] | None = None,
) -> tuple[Pairs, int]:
    """Pairs (i < j) with cosine similarity >= ``threshold``: the first ``keep`` of them and
    how many there are. Rows are compared in blocks of ``BLOCK`` similarities, so memory stays
    bounded rather than ``n x n``. ``clusters`` (an array of n representative ids, updated in
    place) merges every pair found, kept or not, into connected components; ``looser`` does
    the same for pairs at or above each of its (lower) thresholds, in the same pass."""
    x = np.asarray(embeddings, dtype=np.float32)  # no copy for float32 input
    # Norms instead of a normalised copy: the search adds no n x d array of its own.
    inv = 1.0 / np.maximum(np.linalg.norm(x, axis=1), 1e-12).astype(np.float32)
    n = len(x)
    chunk = max(1, min(4096, BLOCK // max(1, n)))
    parts: list[Pairs] = []
    kept = total = 0
    for start in range(0, n, chunk):
        block = x[start : start + chunk]
        # only j > i: the upper triangle, each pair once
        sims = block @ x[start:].T
        sims *= inv[start : start + chunk, None]
        sims *= inv[None, start:]
        rows, cols = np.nonzero(sims >= threshold)
        upper = cols > rows
        rows, cols = rows[upper], cols[upper]
        total += len(rows)
        if clusters is not None and len(rows):
            _merge(clusters, start + rows, start + cols)
        for t, labels in (looser or {}).items():
            # only pairs not yet in one component: at a loose threshold most pairs of a
            # chained cluster are, and listing them all would cost more than the search
            hit = sims >= t
            hit &= labels[start : start + chunk, None] != labels[None, start:]
            r, c = np.nonzero(hit)
            keep_upper = c > r
            if keep_upper.any():
                _merge(labels, start + r[keep_upper], start + c[keep_upper])
        room = keep - kept
        if room > 0 and len(rows):
            vals = np.minimum(1.0, np.round(sims[rows[:room], cols[:room]], 5))
            parts.append(Pairs(start + rows[:room], start + cols[:room], vals))
            kept += len(parts[-1])
    return Pairs.concat(parts), total


def _merge(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the components of ``a[k]`` and ``b[k]`` for every k (``labels`` holds each node's
    component as the id of a representative node; updated in place)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    # Only edges between different components change anything; inside a chained cluster
    # that is nearly none of them, and the graph below stays small.
    new = labels[a] != labels[b]
    a, b = labels[a[new]], labels[b[new]]
    if not len(a):
        return
    n = len(labels)
    # each node tied to its current representative, plus the new edges
    src = np.concatenate([np.arange(n), a])
    dst = np.concatenate([labels, b])
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    labels[:] = first[comp]


def _components(n: int, edges: Sequence[tuple[int, int]]) -> np.ndarray:
    labels = np.arange(n)
    if edges:
        _merge(labels, np.array([e[0] for e in edges]), np.array([e[1] for e in edges]))
    return labels


#: A cluster is a class of look-alikes, not a group of one origin, when its members are
#: spread (1 - mean pairwise cosine) at least this fraction of their class's typical spread...
LOOKALIKE_SPREAD = 0.5
#: ... or when it holds more than this share of its class.
LOOKALIKE_SHARE = 0.5


def _spread(x: np.ndarray) -> float:
    """1 - the mean cosine similarity of the distinct pairs among unit rows ``x``."""
    n = len(x)
    if n < 2:
        return 0.0
    total = x.sum(0, dtype=np.float64)
    return float(1 - (total @ total - n) / (n * (n - 1)))


def split_lookalikes(
    clusters: np.ndarray,
    embeddings: np.ndarray,
    labels: Sequence[int],
    threshold: float,
    floor: np.ndarray,
    floor_threshold: float,
    step: float = 0.025,
) -> tuple[np.ndarray, int]:
    """Re-cluster, at ever tighter similarity, the clusters at ``threshold`` that are
    look-alikes rather than near-copies: all trousers resemble each other, the frames of one
    animation resemble each other far more than their class does. Breaking stops at the
    audit's own clusters (``floor``, at ``floor_threshold``): those are near-copies by
    definition. Returns cluster ids and how many clusters were broken."""
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = np.asarray(labels)
    size = Counter(y.tolist())
    spread = {c: _spread(x[y == c]) for c in size}
    out = np.asarray(clusters, dtype=np.int64).copy()
    floor = np.asarray(floor, dtype=np.int64)
    ids, counts = np.unique(out, return_counts=True)
    todo = [(np.nonzero(out == c)[0], threshold) for c in ids[counts > 1]]
    fresh, broken = 2 * len(out), 0  # new ids past any image index (the floor's ids)
    while todo:
        members, t = todo.pop()
        main, n_main = Counter(y[members].tolist()).most_common(1)[0]
        tight = _spread(x[members]) < LOOKALIKE_SPREAD * spread[main]
        if t >= floor_threshold or (tight and n_main <= LOOKALIKE_SHARE * size[main]):
            continue  # a group of one origin: kept whole
        broken += 1
        finer = t + step
        if finer >= floor_threshold - 1e-9:
            out[members] = floor[members]  # the audit's near-copy clusters, as they are
            continue
        local = np.arange(len(members))
        near_duplicate_pairs(x[members], finer, keep=0, clusters=local)
        for c in np.unique(local):
            part = members[local == c]
            out[part] = fresh
            fresh += 1
            if len(part) > 1:
                todo.append((part, finer))
    return _join(out, floor), broken


def _join(*partitions: np.ndarray) -> np.ndarray:
    """The finest partition coarser than each of ``partitions`` (connected components of
    "same id in any of them"), as the smallest image index of each part."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(partitions[0])
    src, dst = [], []
    for part in partitions:
        order = np.argsort(part, kind="stable")
        same = part[order][1:] == part[order][:-1]
        src.append(order[:-1][same])
        dst.append(order[1:][same])
    a, b = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    return first[comp]


def audit(
    shas: Sequence[str],
    labels: Sequence[int],
    embeddings: np.ndarray | None,
    threshold: float = DEFAULT_THRESHOLD,
    looser: Sequence[float] = (),
) -> AuditReport:
    """Find exact and near duplicates; ``straddling`` is filled by :func:`check_split`.
    ``looser`` thresholds (below ``threshold``) get cluster ids of their own in
    ``report.looser``: the coarser groupings a split may keep apart."""
    n = len(shas)
    report = AuditReport(n=n, threshold=threshold)
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(shas):
        by_hash.setdefault(h, []).append(i)
    report.exact_groups = [g for g in by_hash.values() if len(g) > 1]
    for group in report.exact_groups:
        for a in group:
            for b in group:
                if a < b and labels[a] != labels[b]:
                    report.cross_class.append((a, b))
    exact_edges = [(g[0], j) for g in report.exact_groups for j in g[1:]]
    clusters = _components(n, exact_edges)
    if embeddings is not None:
        extra = {float(t): clusters.copy() for t in looser if t < threshold}
        pairs, total = near_duplicate_pairs(embeddings, threshold, clusters=clusters, looser=extra)
        report.looser = {t: [int(c) for c in labels] for t, labels in extra.items()}
        # content ids as integers: a million-pair gather of 64-character strings is 256 MB
        content = np.unique(np.asarray(shas), return_inverse=True)[1]
        report.near_pairs = pairs.where(content[pairs.a] != content[pairs.b])  # not exact
        report.near_pairs_total = total - (len(pairs) - len(report.near_pairs))
    report.clusters = [int(c) for c in clusters]
    return report


def check_split(
    report: AuditReport, subsets: Sequence[str], given: Sequence[str] | None = None
) -> None:
    """Record the duplicate pairs that sit on different sides of the split, most similar
    first; with ``given`` (the user's own subset of each image), also those on different
    sides of the user's split."""
    exact = [(g[0], j) for g in report.exact_groups for j in g[1:]]
    pairs = Pairs.concat(
        [Pairs([a for a, _ in exact], [b for _, b in exact], [1.0] * len(exact)), report.near_pairs]
    )
    side = np.unique(np.asarray(subsets), return_inverse=True)[1]
    apart = pairs.where(side[pairs.a] != side[pairs.b])
    report.straddling = apart.where(np.argsort(-apart.s, kind="stable"))
    if given is not None:
        user = np.unique(np.asarray(given), return_inverse=True)[1]
        straddling = report.straddling
        report.straddling_given = straddling.where(user[straddling.a] != user[straddling.b])


def explain(
    report: AuditReport,
    classes: Sequence[str],
    labels: Sequence[int],
    paths: Sequence[Path],
    root: Path | None = None,
    layout: str = "class folders",
) -> list[str]:
    """Plain-language findings, each saying what it does to the numbers. ``root`` names
    files by their path under it; ``layout`` (graft.layouts) says how to fix a leaking split
    the user made."""

    def name(i: int) -> str:
        p = Path(paths[i])
        return p.relative_to(root).as_posix() if root and p.is_relative_to(root) else p.name

    out = []
    if report.exact_groups:
        extra = sum(len(g) - 1 for g in report.exact_groups)
        out.append(
            f"{extra} file(s) are exact copies of another file ({len(report.exact_groups)} groups)."
        )
    if report.cross_class:
        a, b = report.cross_class[0]
        out.append(
            f"{len(report.cross_class)} identical pair(s) are filed under different classes, "
            f"e.g. {name(a)} ({classes[labels[a]]}) and {name(b)} "
            f"({classes[labels[b]]}): probably labelling errors."
        )
    if report.near_pairs:
        out.append(
            f"{max(report.near_pairs_total, len(report.near_pairs))} near-duplicate pair(s) "
            f"(cosine >= {report.threshold}) "
            f"form {report.n_clusters_multi} cluster(s) holding {report.images_in_clusters} of "
            f"{report.n} images."
        )
    at_least = "at least " if report.near_pairs_total > len(report.near_pairs) else ""
    given = report.straddling_given
    if given:
        examples = "; ".join(f"{name(a)} and {name(b)} ({s:.3f})" for a, b, s in given[:3])
        out.append(
            f"LEAKAGE in the split you made: {at_least}{len(given)} duplicate pair(s) lie on "
            f"both sides of it, e.g. {examples}. Its validation and test accuracy will "
            f"overstate how the model does on new images. {LEAK_FIXES.get(layout, '')}".rstrip()
        )
    rest = report.straddling
    if given:  # the pairs the user's split does not explain: graft's own carving made them
        rest = rest.where(~_member(rest, given))
    if rest:
        a, b, s = rest[0]
        out.append(
            f"LEAKAGE: {at_least}{len(rest)} duplicate pair(s) straddle the train/validation/"
            f"test split (e.g. {name(a)} and {name(b)}, similarity {s:.3f}). "
            "Validation and test accuracy will overstate how the model does on new images. "
            "Keep each group on one side: --group-by auto, or --group-by REGEX on the file "
            "names."
        )
    return out


#: how to mend a split the user made that puts near-copies on both sides, by layout
LEAK_FIXES = {
    "split folders": "Move each copy into the folder of its twin (or delete it), or put all "
    "images in ROOT/<class>/ and let graft split them: it keeps near-copies together.",
    "labels csv": "Give each copy its twin's split in the CSV (or drop its row), or leave out "
    "the split column and let graft split: it keeps near-copies together.",
}


def _member(pairs: Pairs, among: Pairs) -> np.ndarray:
    """Which of ``pairs`` are also in ``among`` (by their two images)."""
    n = 1 + int(max(p.max(initial=0) for p in (pairs.a, pairs.b, among.a, among.b)))
    return np.isin(pairs.a * n + pairs.b, among.a * n + among.b)


def pick_examples(
    pairs: Sequence[tuple[int, int, float]],
    clusters: Sequence[int],
    labels: Sequence[int],
    limit: int = 6,
) -> list[tuple[int, int, float]]:
    """A few telling pairs: near (not byte-identical) copies first, one per cluster, spread
    over the classes."""
    chosen: list[tuple[int, int, float]] = []
    seen_clusters: set[int] = set()
    seen_labels: set[int] = set()
    ordered = sorted(pairs, key=lambda p: (p[2] >= 0.9999, -p[2]))
    for relax in (False, True):
        for a, b, s in ordered:
            if len(chosen) >= limit:
                return chosen
            if (a, b, s) in chosen:
                continue
            if not relax and (clusters[a] in seen_clusters or labels[a] in seen_labels):
                continue
            chosen.append((a, b, s))
            seen_clusters.add(clusters[a])
            seen_labels.add(labels[a])
    return chosen


def draw_examples(
    report: AuditReport,
    paths: Sequence[Path],
    labels: Sequence[int],
    subsets: Sequence[str] | None,
    out: Path,
    root: Path | None,
) -> bool:
    """Draw a few telling pairs: those straddling the split when there is one (else all
    near-duplicates), or identical files in different classes. False when there are none."""
    pairs = report.straddling if subsets is not None else report.near_pairs
    examples = pick_examples(
        pairs or [(a, b, 1.0) for a, b in report.cross_class], report.clusters, labels
    )
    if not examples:
        return False
    if not pairs:
        title = "Identical images in different classes"
    elif subsets is not None:
        title = "Near-duplicates on both sides of the split"
    else:
        title = "Near-duplicate examples (a random split would leak them)"
    plot_pairs(examples, paths, subsets, out, root, title=title)
    return True


def plot_pairs(
    pairs: Sequence[tuple[int, int, float]],
    paths: Sequence[Path],
    subsets: Sequence[str] | None,
    out: Path,
    root: Path | None = None,
    title: str = "Near-duplicates across the split",
) -> None:
    """Example pairs side by side (three pairs a row), with subset and similarity."""
    from .data import load_image
    from .io import display
    from .plots import clipped, save_figure, subplots, tight_layout

    pairs = list(pairs)[:12]  # a picture of examples, never of everything
    if not pairs:
        return
    per_row = min(3, len(pairs))
    rows = (len(pairs) + per_row - 1) // per_row
    fig, axes = subplots(rows, 2 * per_row, figsize=(4.6 * per_row, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, (a, b, s) in enumerate(pairs):
        r, c = divmod(n, per_row)
        for k, i in enumerate((a, b)):
            ax = axes[r, 2 * c + k]
            ax.imshow(load_image(paths[i], 256))
            p = Path(paths[i])
            name = p.relative_to(root).as_posix() if root and p.is_relative_to(root) else p.name
            where = f"\n[{subsets[i]}]" if subsets is not None else ""
            ax.set_title(f"{clipped(display(name), 30, keep_end=True)}{where}", fontsize=8)
        axes[r, 2 * c].text(
            1.0,
            -0.08,
            f"similarity {s:.3f}",
            transform=axes[r, 2 * c].transAxes,
            fontsize=8,
            ha="center",
            va="top",
            color="#cf222e",
        )
    fig.suptitle(title, fontsize=11)
    tight_layout(fig)
    save_figure(fig, out)


def audit_for_split(config: Any, data: Any, embeddings: np.ndarray) -> AuditReport:
    """The duplicate audit of a training run at ``config.dup_threshold``, with the looser
    clusterings the default split may try (``config.group_threshold`` upwards)."""
    rungs = grouping_ladder(config.group_threshold, config.dup_threshold)
    return audit(data.sha256, data.labels, embeddings, config.dup_threshold, looser=rungs)


def joined_audits(reports: Sequence[AuditReport], clusters_of: str = "") -> AuditReport:
    """One audit whose clusters (at each threshold) join those of every report on the same
    images: near-copies to any of the embeddings stay on one side of a split made on it, so
    ``--backbone auto``'s kept backbone finds none straddling. Pairs and exact groups are
    the first report's; ``clusters_of`` says whose the clusters are (the split's note)."""
    first = reports[0]

    def union(columns: list[Sequence[int]]) -> list[int]:
        labels, every = np.arange(first.n), np.arange(first.n)
        for col in columns:  # each image joined to its cluster's representative
            _merge(labels, every, np.asarray(col, dtype=np.int64))
        return labels.tolist()

    return replace(
        first,
        clusters=union([r.clusters for r in reports]),
        looser={t: union([r.looser[t] for r in reports]) for t in first.looser},
        clusters_of=clusters_of,
    )


def audit_dataset(
    data: Any,
    config: Any,
    reporter: Any = None,
) -> AuditReport:
    """Audit a scanned dataset with the pooled features of ``config``'s backbone, through
    the same frozen-feature path (and cache) as training: same size, normalisation and
    background trim, so ``graft scan`` and ``graft train`` compare the same pixels."""
    import torch

    from .features import FrozenFeatures

    features = FrozenFeatures.pretrained(config, data, reporter)
    with torch.no_grad():
        emb = features.views(data, range(len(data.paths)))
    return audit(data.sha256, data.labels, emb.numpy(), config.dup_threshold)
