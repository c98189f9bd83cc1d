"""The default split: stratified per class within bounds, near-copies kept apart, classes of
look-alikes not mistaken for near-copies, and a clear report where groups make
stratification impossible."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from graft import TrainConfig
from graft.audit import audit, grouping_ladder, split_lookalikes
from graft.errors import SplitError
from graft.progress import Reporter
from graft.split import (
    SHARE_BOUNDS,
    choose_split,
    class_shares,
    make_group_split,
    make_split,
    share_problems,
)

DIM = 64


def _origins(rng: np.random.Generator, n_origins: int, copies: int, noise: float) -> np.ndarray:
    """``copies`` near-identical images of each of ``n_origins`` unrelated pictures."""
    centres = rng.normal(size=(n_origins, DIM))
    return np.concatenate([c + noise * rng.normal(size=(copies, DIM)) for c in centres])


def _lookalikes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` images of one kind of object, none a copy of another: all alike, none closer
    to any other than to the rest (like Fashion-MNIST's trousers)."""
    return rng.normal(size=DIM) * 3 + rng.normal(size=(n, DIM))


def _run(embeddings: np.ndarray, labels: list[int], classes: list[str], **options):
    config = TrainConfig(**options)
    shas = [f"img{i}" for i in range(len(labels))]
    rungs = grouping_ladder(config.group_threshold, config.dup_threshold)
    report = audit(shas, labels, embeddings, config.dup_threshold, looser=rungs)
    data = SimpleNamespace(labels=labels, classes=classes, paths=shas, relpath=str)
    return choose_split(config, data, report, Reporter(verbose=False), embeddings), report


def _within_bounds(split, labels: list[int], classes: list[str]) -> None:
    lo, hi = SHARE_BOUNDS
    for name, shares in class_shares(split.subsets, labels, classes).items():
        n = Counter(labels)[classes.index(name)]
        for subset, asked in (("val", 0.1), ("test", 0.2)):
            slack = 1 / n  # one image
            assert lo * asked - slack <= shares[subset] <= hi * asked + slack, (name, shares)


def test_a_class_of_lookalikes_is_split_stratified_not_moved_whole() -> None:
    rng = np.random.default_rng(0)
    trousers = _lookalikes(rng, 200)  # one class, a chain at cosine 0.9, no shared origin
    shirts = _origins(rng, 40, 5, 0.05)  # the others: frames of 40 sources each
    dresses = _origins(rng, 40, 5, 0.05)
    emb = np.concatenate([trousers, shirts, dresses])
    labels = [0] * 200 + [1] * 200 + [2] * 200
    classes = ["trouser", "shirt", "dress"]
    split, report = _run(emb, labels, classes)
    clusters = np.asarray(report.clusters_at(0.9))
    assert np.unique(clusters[:200]).size < 20  # the loose rung alone would move it whole
    assert split.problems == []
    _within_bounds(split, labels, classes)
    assert "look-alikes" in split.note


def test_true_near_copies_stay_together_and_the_split_stays_stratified() -> None:
    rng = np.random.default_rng(1)
    emb = np.concatenate([_origins(rng, 20, 6, 0.05) for _ in range(3)])  # 20 sources a class
    labels = [c for c in range(3) for _ in range(120)]
    classes = ["a", "b", "c"]
    split, _ = _run(emb, labels, classes)
    assert split.grouped and "look-alikes" not in split.note
    source = np.arange(len(labels)) // 6
    for s in np.unique(source):
        assert len({split.subsets[i] for i in np.nonzero(source == s)[0]}) == 1
    _within_bounds(split, labels, classes)
    assert split.problems == []


def test_groups_that_make_stratification_impossible_are_reported_by_class() -> None:
    rng = np.random.default_rng(2)
    few = _origins(rng, 3, 20, 0.05)  # 'rare': 60 images from 3 sources only
    emb = np.concatenate([few, _origins(rng, 60, 1, 0.0), _origins(rng, 60, 1, 0.0)])
    labels = [0] * 60 + [1] * 60 + [2] * 60
    classes = ["rare", "b", "c"]
    split, _ = _run(emb, labels, classes)
    assert split.grouped  # the three sources are still kept apart
    assert len(split.problems) == 1 and split.problems[0].startswith("'rare'")
    assert "3 groups, the largest of 20" in split.problems[0]


def test_group_split_keeps_every_class_within_bounds_when_groups_allow() -> None:
    rng = np.random.default_rng(3)
    labels, groups = [], []
    for c in range(5):  # uneven group sizes, 150 images a class
        sizes = rng.integers(1, 12, size=40)
        sizes = sizes[np.cumsum(sizes) <= 150]
        sizes = [*sizes.tolist(), 150 - int(sum(sizes))]
        for g, size in enumerate(sizes):
            labels += [c] * size
            groups += [f"{c}-{g}"] * size
    classes = list("abcde")
    subsets = make_group_split(labels, groups, classes, 0.2, 0.1, seed=0)
    assert share_problems(subsets, labels, classes, 0.2, 0.1) == []
    sides: dict[str, set[str]] = {}
    for g, s in zip(groups, subsets, strict=True):
        sides.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in sides.values())
    # seeded: the same seed gives the same split, another seed another one
    assert subsets == make_group_split(labels, groups, classes, 0.2, 0.1, seed=0)
    assert subsets != make_group_split(labels, groups, classes, 0.2, 0.1, seed=1)


def test_ungrouped_images_are_split_as_exactly_as_make_split() -> None:
    labels = [c for c in range(4) for _ in range(50)]
    groups = [str(i) for i in range(len(labels))]
    subsets = make_group_split(labels, groups, list("abcd"), 0.2, 0.1, seed=0)
    assert Counter(zip(labels, subsets, strict=True)) == Counter(
        zip(labels, make_split(labels, list("abcd"), 0.2, 0.1, seed=0), strict=True)
    )


def test_too_few_groups_is_an_error() -> None:
    with pytest.raises(SplitError, match="Only 2 groups"):
        make_group_split([0, 0, 1, 1], ["x", "x", "y", "y"], ["a", "b"], 0.2, 0.1, seed=0)


def test_split_lookalikes_keeps_tight_clusters_and_breaks_loose_ones() -> None:
    rng = np.random.default_rng(4)
    copies = _origins(rng, 10, 5, 0.05)  # 10 tight groups of 5
    alike = _lookalikes(rng, 50)  # one loose class
    emb = np.concatenate([copies, alike])
    labels = [0] * 50 + [1] * 50
    clusters = np.concatenate([np.repeat(np.arange(10), 5), np.full(50, 50)])
    floor = np.arange(100)  # at the audit's threshold: no near-copies among the look-alikes
    out, broken = split_lookalikes(clusters, emb, labels, 0.9, floor, 0.95)
    assert broken >= 1
    assert [len(set(out[i * 5 : i * 5 + 5])) for i in range(10)] == [1] * 10
    assert len(set(out[50:])) > 10
    # never finer than the audit's own clusters: those are near-copies by definition
    floor = np.concatenate([np.arange(50), np.full(50, 50)])
    out, _ = split_lookalikes(clusters, emb, labels, 0.9, floor, 0.95)
    assert len(set(out[50:])) == 1


def test_the_run_reports_each_class_share_and_warns_outside_the_bounds(
    shapes_dir, tmp_path
) -> None:
    from conftest import FAST
    from graft import fit

    cfg = TrainConfig(**{**FAST, "epochs": 1, "fine_tune_epochs": 0})
    result = fit(cfg, shapes_dir, tmp_path / "run", reporter=Reporter(verbose=False))
    shares = result.summary["class_shares"]
    assert set(shares) == set(result.classes)
    for share in shares.values():
        assert sum(share.values()) == pytest.approx(1.0)
    assert result.summary["share_warnings"] == []  # 14 images a class split stratified
    html = (tmp_path / "run" / "report.html").read_text()
    assert "share of its images in each subset" in html


def test_a_class_of_three_big_groups_still_gets_test_images() -> None:
    """Closest to the bounds: one of its groups in test (overshooting) beats none at all."""
    labels = [0] * 24 + [1] * 24 + [2] * 24
    groups = [f"t{i // 8}" for i in range(24)] + [str(i) for i in range(24, 72)]
    subsets = make_group_split(labels, groups, ["tri", "a", "b"], 0.2, 0.1, seed=0)
    tri = Counter(subsets[:24])
    assert tri["test"] == 8 and tri["train"] == 16
    problems = share_problems(subsets, labels, ["tri", "a", "b"], 0.2, 0.1, groups)
    assert len(problems) == 1 and problems[0].startswith("'tri' has val 0%")
