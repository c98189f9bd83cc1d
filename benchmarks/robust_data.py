"""The data sets of benchmarks/bench_robust.py, each written as a pre-split folder
(``data/{train,val,test}/<class>/``, which graft uses as given) plus, where the set has one,
a folder of images from elsewhere with the same classes.

The images come from the other benchmarks' builders (reused, not copied), in their own
caches, so a download is shared: ``sprites`` from bench_generalize.build, ``fashion`` from
bench_split.build_fashion, ``demo`` from scripts/demo_data.build (the folder ``make demo``
trains on), ``emoji`` from emoji_data.build. The split folders hold hard links to those
files (copies where the file system refuses links).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "scripts"))

import emoji_data  # noqa: E402

#: --quick: classes kept, and images kept per class in each part (train, val, test, other)
QUICK_CLASSES = 4
QUICK_IMAGES = {"train": 12, "val": 3, "test": 4, "ood": 4}


@dataclass
class BenchSet:
    """One data set: the pre-split folder, the folder from elsewhere and what it is."""

    name: str
    data: Path  # data/{train,val,test}/<class>/
    ood: Path | None  # <class>/ images from elsewhere (None: the set has none)
    ood_label: str  # "out-of-domain" or "independent" (same source, never seen)
    note: str  # how it was built, for the JSON


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write(out: Path, rows: list[tuple[Path, str, str]], quick: bool) -> dict[str, int]:
    """Link ``(file, class, part)`` rows into ``out/<part>/<class>/``; with ``quick`` only
    the first QUICK_CLASSES classes and QUICK_IMAGES[part] files of each. Returns the
    number of files per part."""
    classes = sorted({c for _, c, _ in rows})
    if quick:
        classes = classes[:QUICK_CLASSES]
    taken: dict[tuple[str, str], int] = {}
    per_part: dict[str, int] = {}
    for src, cls, part in sorted(rows, key=lambda r: (r[1], r[2], r[0].as_posix())):
        if cls not in classes:
            continue
        n = taken.get((cls, part), 0)
        if quick and n >= QUICK_IMAGES[part]:
            continue
        taken[cls, part] = n + 1
        per_part[part] = per_part.get(part, 0) + 1
        folder = out if part == "ood" else out / part
        _link(src, folder / cls / src.name)
    return per_part


def _class_rows(folder: Path, part: str) -> list[tuple[Path, str, str]]:
    return [(p, p.parent.name, part) for p in sorted(folder.glob("*/*")) if p.is_file()]


def _fresh(out: Path) -> bool:
    """True when ``out`` was built already; else empties it for a new build."""
    if (out / ".built").exists():
        return True
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return False


def _tag(name: str, quick: bool) -> str:
    return name + ("-quick" if quick else "")


def sprites(cache: Path, quick: bool) -> BenchSet:
    """Pokémon 152-251: animation frames split by animation (bench_generalize's groups CSV
    and its split, seed 42, so in-domain figures match that benchmark's), the dream-world
    artwork from elsewhere. A class has only 4-8 animations, so whole-animation parts are
    coarse: the split comes out near 74/4/23 and only about a third of the classes have
    validation images (graft warns; early stopping and C see those alone)."""
    return _pokemon(cache, quick, "sprites", 152, 251)


def sprites_held_out(cache: Path, quick: bool) -> BenchSet:
    """Pokémon 252-386 (135 classes) by :func:`sprites`'s protocol: a case no default was
    chosen on (the detail size, the views and the probe were measured on 152-251, the
    emoji, Fashion-MNIST and the demo), to check that they hold on one they did not see."""
    return _pokemon(cache, quick, "sprites-held-out", 252, 386)


def _pokemon(cache: Path, quick: bool, name: str, first: int, last: int) -> BenchSet:
    import bench_generalize

    frames, artwork, groups = bench_generalize.build(
        ROOT / ".cache" / "bench-generalize", 24, first, last
    )
    out = cache / _tag(name, quick)
    note = f"Pokémon {first}-{last}, 24 frames each, split by animation; OOD: dream-world artwork"
    if not _fresh(out):
        data, subsets = bench_generalize.shared_split(frames, groups)
        rows = [
            (p, data.classes[y], s)
            for p, y, s in zip(data.paths, data.labels, subsets, strict=True)
        ]
        _write(out / "data", rows, quick)
        if quick:  # the model knows only the kept classes: evaluate on theirs alone
            _write(out / "ood", _class_rows(artwork, "ood"), quick)
        (out / ".built").touch()
    return BenchSet(name, out / "data", out / "ood" if quick else artwork, "OOD", note)


def emoji(cache: Path, quick: bool) -> BenchSet:
    """apple/google/facebook emoji split by base emoji; twitter's drawings from elsewhere
    (emoji_data builds both, already split)."""
    data, ood = emoji_data.build(ROOT / ".cache" / "emoji", quick)
    note = (
        f"emoji-datasource {emoji_data.VERSION}: subcategories, apple+google+facebook split "
        "by base emoji; OOD: twitter"
    )
    return BenchSet("emoji", data, ood, "OOD", note)


def _stratified(files: list[tuple[Path, str]]) -> list[tuple[Path, str, str]]:
    """70/10/20 per class, image by image, seed 0 (emoji_data.split_groups)."""
    side = emoji_data.split_groups([(c, p.as_posix()) for p, c in files], seed=0)
    return [(p, c, side[p.as_posix()]) for p, c in files]


def fashion(cache: Path, quick: bool) -> BenchSet:
    """Fashion-MNIST (bench_split.build_fashion): its training folder split 70/10/20; its
    independent test folder (same source, never seen) in the out-of-domain column."""
    import bench_split

    source = ROOT / ".cache" / "bench_split"
    source.mkdir(parents=True, exist_ok=True)
    train, test = bench_split.build_fashion(source)
    out = cache / _tag("fashion", quick)
    note = "Fashion-MNIST 600/class split 70/10/20 (seed 0); independent: 200/class"
    if not _fresh(out):
        _write(out / "data", _stratified([(p, c) for p, c, _ in _class_rows(train, "")]), quick)
        if quick:
            _write(out / "ood", _class_rows(test, "ood"), quick)
        (out / ".built").touch()
    return BenchSet("fashion", out / "data", out / "ood" if quick else test, "independent", note)


def demo(cache: Path, quick: bool) -> BenchSet:
    """The demo's five Pokémon (scripts/demo_data.build, the folder ``make demo`` trains on),
    split 70/10/20 image by image as asked. Frames of one animation are near copies and
    land on both sides, so its in-domain figure is optimistic; no out-of-domain set here
    (the five artworks are too few to say anything)."""
    import demo_data

    frames, _ = demo_data.build(ROOT / ".cache" / "demo", demo_data.SEED_FIVE)
    out = cache / _tag("demo", quick)
    note = "the demo's five Pokémon, all frames, split 70/10/20 image by image (seed 0)"
    if not _fresh(out):
        _write(out / "data", _stratified([(p, c) for p, c, _ in _class_rows(frames, "")]), quick)
        (out / ".built").touch()
    return BenchSet("demo", out / "data", None, "", note)


BUILDERS: dict[str, Callable[[Path, bool], BenchSet]] = {
    "sprites": sprites,
    "sprites-held-out": sprites_held_out,
    "emoji": emoji,
    "fashion": fashion,
    "demo": demo,
}
