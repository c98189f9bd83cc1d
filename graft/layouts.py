"""The three ways a labelled dataset comes in, and the split a user already made.

1. One folder per class (graft splits it)::

       ROOT/cat/*.jpg   ROOT/dog/*.jpg

2. Already split, as YOLO, timm and Keras expect (``train`` required; ``val``, ``valid`` or
   ``validation``, and ``test`` optional; any case)::

       ROOT/train/cat/*.jpg   ROOT/val/cat/*.jpg   ROOT/test/cat/*.jpg   (and dog/ in each)

3. A CSV of labels (``--labels-csv FILE``): a header row with the columns ``path`` and
   ``label``, optionally ``split``; paths relative to the CSV's folder, or absolute.

Here, without torch or image decoding: :func:`detect_layout` tells the folder layouts apart
(for :func:`graft.data.scan`) and refuses the ambiguous one, split folders next to class
folders; :func:`parse_labels_csv` reads a labels CSV, listing each bad row with its line
instead of failing on it (:func:`graft.data.read_labels_csv` then decodes the images;
:func:`graft.data.open_dataset` takes either). A split the user made is used as given
(graft.split): its test part is touched once, at the end; a part it lacks (validation,
test) is carved from its training images the way graft splits a folder (stratified,
near-copies kept together), and the audit looks for near-copies across it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, UsageError
from .files import IMAGE_EXTENSIONS, is_run_folder, iter_files

__all__ = [
    "SPLIT_NAMES",
    "LabelRows",
    "Layout",
    "check_given",
    "class_folders",
    "describe_layout",
    "detect_layout",
    "groups_from_csv",
    "groups_from_pattern",
    "named_groups",
    "parse_labels_csv",
    "say_ignored",
]

#: folder names (and CSV split values) read as a split, any case, and the subset each means
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SUBSETS = ("train", "val", "test")
WORDS = {"train": "training", "val": "validation", "test": "test"}
#: how many bad rows or examples a message lists before "and N more"
SHOWN = 5


def _listed(items: list[str], shown: int = SHOWN) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


# --------------------------------------------------------------------------- folders


def only_runs(folder: Path) -> bool:
    """A folder that is a graft run, or holds runs and no image outside them (``runs/``
    made inside the data folder by ``--out``)."""
    if is_run_folder(folder):
        return True
    if not any(is_run_folder(d) for d in folder.iterdir() if d.is_dir()):
        return False
    return not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in iter_files(folder))


def class_folders(root: Path) -> tuple[list[str], list[str]]:
    """The class folders of ``root``, and the folders left out as graft runs."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    runs = [p.name for p in folders if only_runs(p)]
    return [p.name for p in folders if p.name not in runs], runs


def root_notes(root: Path, left_out: list[str]) -> list[str]:
    """What a folder of class folders holds besides them: graft runs, loose images."""
    notes = []
    if left_out:
        notes.append(
            f"Left out {', '.join(repr(n) for n in left_out)}: graft run folders, not classes "
            "(keep run folders outside the data folder)."
        )
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        notes.append(
            f"{len(loose)} image(s) lie directly in {root}, outside any class folder "
            f"(e.g. {loose[0].name}): they are not used. Move them into their class's folder."
        )
    return notes


@dataclass
class Layout:
    """What :func:`detect_layout` found in a dataset folder."""

    kind: str  # "class folders" or "split folders"
    #: the folder holding the class folders of each subset ("" when the folder is not split)
    parts: dict[str, Path]
    classes: list[str]
    names: dict[str, str] = field(default_factory=dict)  # subset -> its folder's own name
    notes: list[str] = field(default_factory=list)
    fix_train: str = ""  # how to give a class training images (for check_given's error)


def detect_layout(root: Path, folders: list[str], evaluating: bool = False) -> Layout:
    """One folder per class, or ROOT/train|val|test/<class>/. ``folders`` are ROOT's
    sub-folders (graft runs left out). Raises :class:`DataError` when split folders sit
    next to class folders, when a split folder holds no class folders, when there is no
    train folder or two folders mean one subset, and (``evaluating``) for any split folder:
    a run is evaluated on one part of it."""
    named = {n: SPLIT_NAMES[n.lower()] for n in folders if n.lower() in SPLIT_NAMES}
    if not named:
        return Layout("class folders", {"": root}, list(folders))
    others = [n for n in folders if n not in named]
    if others:
        raise DataError(_mixed_message(root, list(named), others))
    by_subset: dict[str, list[str]] = {}
    for name, subset in named.items():
        by_subset.setdefault(subset, []).append(name)
    for subset, names in by_subset.items():
        if len(names) > 1:
            raise DataError(
                f"{root} has the folders {' and '.join(names)}: both are read as the "
                f"{WORDS[subset]} split. Merge them into one."
            )
    if evaluating:
        test = by_subset.get("test", by_subset.get("val", ["test"]))[0]
        raise DataError(
            f"{root} is split into {', '.join(named)} folders: evaluate on one of them, e.g. "
            f"`graft evaluate RUN {root / test}` (or `graft evaluate RUN` for the run's own "
            "test split)."
        )
    if "train" not in by_subset:
        raise DataError(
            f"{root} holds {' and '.join(named)} but no train folder. A split dataset needs "
            f"{root}/train/<class>/ with the training images (val/ and test/ are optional); "
            f"if {' and '.join(repr(n) for n in named)} are class names, rename those folders."
        )
    layout = Layout("split folders", {}, [])
    classes: set[str] = set()
    for subset in SUBSETS:
        if subset not in by_subset:
            continue
        name = by_subset[subset][0]
        inner, runs = class_folders(root / name)
        if not inner:
            raise DataError(_no_classes_message(root, name, list(named)))
        layout.parts[subset], layout.names[subset] = root / name, name
        classes.update(inner)
        layout.notes += root_notes(root / name, runs)
    layout.classes = sorted(classes)
    layout.fix_train = f"add its folder with images under {root / by_subset['train'][0]}"
    return layout


def _mixed_message(root: Path, split: list[str], classes: list[str]) -> str:
    first = split[0]
    return (
        f"{root} mixes folders named like a split ({', '.join(split)}) with class folders "
        f"({_listed(classes)}). graft reads either one folder per class (ROOT/<class>/) or a "
        "split you made (ROOT/train/<class>/, with val/ and test/ optional), not both. Fix it "
        f"one of two ways: if {first}/ holds a split, move the class folders into it (e.g. "
        f"{root / first / classes[0]}/); if {first!r} is a class, rename its folder (e.g. "
        f"to '{first}_class') so it is not read as a split."
    )


def _no_classes_message(root: Path, name: str, split: list[str]) -> str:
    return (
        f"{root / name} holds no class folders. {root} has folders named like a split "
        f"({', '.join(split)}), so graft reads them as train/val/test, each with one folder "
        f"per class (ROOT/{name}/<class>/<images>). Fix it one of two ways: if they are a "
        "split, put each image into a class folder inside them (unlabelled images, such as a "
        "competition's test set, belong outside ROOT); if they are your classes, rename those "
        f"folders (e.g. '{name}' to '{name}_class')."
    )


def check_given(data: Any, fix_train: str) -> list[str]:
    """The user's own split, class by class: a class with validation or test images but
    none to train on is refused (:class:`DataError`); one missing from validation or test
    is warned about (returned)."""
    if data.given is None:
        return []
    per = Counter(zip(data.labels, data.given, strict=True))
    have = set(data.given)
    untrained = [c for i, c in enumerate(data.classes) if per[(i, "train")] == 0]
    if untrained:
        raise DataError(
            "Classes with validation or test images but no training images: "
            f"{_listed([repr(c) for c in untrained])}. The model cannot learn a class it never "
            f"sees: to keep such a class, {fix_train}; else remove it from the other parts."
        )
    out = []
    effect = {
        "val": "early stopping, the kept epoch and calibration are chosen without them",
        "test": "the final test cannot measure them (no recall; the accuracy leaves them out)",
    }
    for s in ("val", "test"):
        lacking = [c for i, c in enumerate(data.classes) if per[(i, s)] == 0]
        if s in have and lacking:
            out.append(
                f"No {WORDS[s]} images of {_listed([repr(c) for c in lacking])} in the given "
                f"split: {effect[s]}."
            )
    return out


def describe_layout(data: Any, names: dict[str, str], source: str = "") -> str:
    """One line: the layout found and how many images each part holds."""
    n, k = len(data.paths), len(data.classes)
    if data.given is None:
        if data.layout == "labels csv":
            return (
                f"Layout: labels CSV {source} ({n:,} images, {k} classes; no split column: "
                "graft splits them)."
            )
        return f"Layout: one folder per class ({n:,} images, {k} classes); graft splits them."
    count = Counter(data.given)
    have = [s for s in SUBSETS if count[s]]
    parts = "/".join(names.get(s, s) for s in have)
    head = (
        f"pre-split folders {parts}"
        if data.layout == "split folders"
        else f"labels CSV {source}, split column {parts}"
    )
    line = f"Layout: {head} ({' / '.join(f'{count[s]:,}' for s in have)} images, {k} classes)"
    carved = [WORDS[s] for s in ("val", "test") if not count[s]]
    if carved:
        line += f"; {' and '.join(carved)} will be carved from {names.get('train', 'train')}"
    return line + "."


# --------------------------------------------------------------------------- labels CSV


@dataclass
class LabelRows:
    """A labels CSV, row by row (:func:`parse_labels_csv`)."""

    csv: Path  # the CSV itself, resolved
    good: list[tuple[Path, str, str, int]]  # (file, label, subset or "", line)
    bad: list[tuple[Path, str]]  # (file, "NAME line N: what is wrong")
    rows: int  # data rows (blank lines not counted)


def parse_labels_csv(path: str | Path) -> LabelRows:
    """Read a labels CSV: a header row naming ``path`` and ``label`` (and optionally
    ``split``), then one image a row. A row without a path, with an empty label or an
    unknown split name, naming a file that is not there, or repeating a file is bad: it is
    listed with its line and left out, never fatal on its own. Files are not opened here."""
    csv_path = Path(path).expanduser()
    if not csv_path.is_file():
        found = "a folder, not a file" if csv_path.exists() else "no such file"
        raise UsageError(
            f"--labels-csv {path}: {found}. Give a CSV file with a header row path,label "
            "(and optionally split); relative paths are taken from the current folder."
        )
    csv_path = csv_path.resolve()
    rows, has_split = _csv_rows(csv_path)
    good, bad = _check_rows(csv_path, rows, has_split)
    if not good:
        raise DataError(
            f"{csv_path} lists no usable image ({len(rows)} rows"
            + (f"; {_listed([f'{r} ({p.name})' for p, r in bad], 3)}" if bad else "")
            + f"). Paths are taken relative to the CSV's folder ({csv_path.parent}) unless "
            "absolute."
        )
    return LabelRows(csv_path, good, bad, len(rows))


def line_of(reason: str) -> int:
    """The line number in a skipped row's reason ("labels.csv line 12: ...")."""
    try:
        return int(reason.split(": ", 1)[0].rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0


def _csv_rows(path: Path) -> tuple[list[tuple[int, str, str, str]], bool]:
    """Each data row as ``(line, path, label, split)`` (cells stripped) and whether the CSV
    has a split column. The header is required; commas, semicolons and tabs all work."""
    try:
        # utf-8-sig: a spreadsheet's export often starts with a byte-order mark
        text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"{path} is unreadable ({exc}).") from exc
    first = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=first.count) if first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "label" not in header:
            raise DataError(
                f"{path} needs a header row naming its columns path and label (and optionally "
                f"split); its first row is {first[:120]!r}. For example:\n"
                "path,label,split\nimages/cat1.jpg,cat,train"
            )
        where = {name: header.index(name) for name in ("path", "label", "split") if name in header}
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # a blank line
            cell = {k: cells[i].strip() if i < len(cells) else "" for k, i in where.items()}
            rows.append((reader.line_num, cell["path"], cell["label"], cell.get("split", "")))
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV (line {reader.line_num}: {exc}).") from exc
    return rows, "split" in where


def _check_rows(
    csv_path: Path, rows: list[tuple[int, str, str, str]], has_split: bool
) -> tuple[list[tuple[Path, str, str, int]], list[tuple[Path, str]]]:
    """The usable rows as ``(file, label, subset, line)``, and the bad ones as ``(file,
    reason)`` with the reason starting "NAME line N: "."""
    good: list[tuple[Path, str, str, int]] = []
    bad: list[tuple[Path, str]] = []
    seen: dict[Path, tuple[int, str]] = {}
    for line, rel, label, split in rows:
        where = f"{csv_path.name} line {line}"
        if not rel:
            bad.append((csv_path, f"{where}: no path"))
            continue
        file = _locate(csv_path.parent, rel)
        problem = ""
        subset = SPLIT_NAMES.get(split.lower(), "") if has_split else ""
        if not label:
            problem = "empty label"
        elif has_split and not split:
            # a split column holds the whole split: a blank cell is not "let graft choose"
            problem = (
                "empty split (with a split column, every row names train, val or test; "
                "leave the column out to let graft split)"
            )
        elif has_split and not subset:
            problem = f"unknown split {split!r} (use train, val, valid, validation or test)"
        elif not file.exists():
            problem = "no such file"
        elif file.is_dir():
            problem = "a folder, not an image file"
        elif file.resolve() in seen:
            first, first_label = seen[file.resolve()]
            other = f" with another label ({first_label!r})" if first_label != label else ""
            problem = f"listed again (first on line {first}{other})"
        if problem:
            bad.append((file, f"{where}: {problem}"))
            continue
        seen[file.resolve()] = (line, label)
        good.append((file.resolve(), label, subset, line))
    return good, bad


def _locate(base: Path, rel: str) -> Path:
    """A CSV's path: absolute, or relative to the CSV's folder; Windows separators are
    accepted when the file is not found as written."""
    path = Path(rel).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists() and "\\" in rel:
        alt = Path(rel.replace("\\", "/")).expanduser()
        alt = alt if alt.is_absolute() else base / alt
        if alt.exists():
            return alt
    return path


# --------------------------------------------------------------------------- groups


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


def groups_from_csv(path: Path, relpaths: Sequence[str]) -> tuple[list[str], int, list[str]]:
    """Groups from a CSV with columns ``path`` (relative to the dataset root) and ``group``.
    Returns each image's group, how many images the CSV does not name, and its rows that
    name no image; a CSV that names none of the images is refused (its paths are probably
    not relative to the root)."""
    mapping: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "group"} <= set(reader.fieldnames):
                raise DataError(
                    f"{path} needs the columns 'path' and 'group' (found {reader.fieldnames})."
                )
            for row in reader:
                mapping[(row["path"] or "").strip()] = (row["group"] or "").strip()
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV file ({exc}).") from exc
    out = [mapping.get(rel, f"file:{rel}") for rel in relpaths]
    named = set(relpaths)
    stray = [p for p in mapping if p not in named]
    if mapping and len(stray) == len(mapping):
        like = f", like {relpaths[0]!r}" if relpaths else ""
        raise DataError(
            f"None of the {len(mapping)} paths in {path} is an image of the data folder (e.g. "
            f"{stray[0]!r}). Write them relative to the data folder{like}."
        )
    return out, sum(rel not in mapping for rel in relpaths), stray


def named_groups(config: Any, data: Any) -> tuple[list[str] | None, str]:
    """The group of each image, from --group-by REGEX / --groups-csv, and a sentence saying
    so (the audit's clusters are graft.split's)."""
    rel = [data.relpath(p) for p in data.paths]
    if config.groups_csv:
        groups, unmatched, stray = groups_from_csv(Path(config.groups_csv), rel)
        source = f"groups from {config.groups_csv}"
        if stray:
            source += f" ({len(stray)} of its rows name no image, e.g. {stray[0]!r}: ignored)"
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


def say_ignored(config: Any, reporter: Any, missing: Sequence[str], who: str) -> None:
    """Warn about the split options a given split makes moot: the share of a part the user
    gave, and grouping when graft carves nothing (``missing``: the parts it carves)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    ignored = [
        f"--{name.replace('_', '-')} {getattr(config, name)}"
        for name, subset in (("val_size", "val"), ("test_size", "test"))
        if subset not in missing and getattr(config, name) != defaults[name]
    ]
    if not missing:
        if config.group_by not in (None, "none"):
            ignored.append(f"--group-by {config.group_by}")
        if config.groups_csv:
            ignored.append(f"--groups-csv {config.groups_csv}")
    if ignored:
        reporter.warn(
            f"{who[0].upper()}{who[1:]} is used as given: {', '.join(ignored)} "
            f"{'is' if len(ignored) == 1 else 'are'} ignored: such options shape only the parts "
            "graft carves from the training images."
        )
