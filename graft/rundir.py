"""The run folder: one owner of its file names, and of reading and writing them.

    RUN/
      config.json              the TrainConfig, plus data root, classes, weights, plan, versions
      split.csv                path,class,subset,sha256,group (graft.split)
      history.csv              one row per epoch (:class:`EpochRecord`)
      model.safetensors        the kept weights with their description (graft.model)
      checkpoint.safetensors   what a resume needs after the last finished epoch
      summary.json             what training reported (:class:`Summary`)
      evaluation.json          the held-out split's evaluation (graft.evaluate)
      audit.json, skipped.csv, model.onnx, report.html and the PNG figures

Every other module asks this one for those names: ``RunDir(path).summary`` is the path,
``RunDir(path).read_summary()`` the content, with an error that says what to do when it is
missing or unreadable.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from .errors import RunExistsError, RunFolderError
from .io import atomic_write_json, atomic_write_text, read_json

__all__ = ["MANIFEST", "RUN_FILES", "EpochRecord", "RunDir", "Summary"]

CONFIG = "config.json"
SPLIT = "split.csv"
HISTORY = "history.csv"
MODEL = "model.safetensors"
CHECKPOINT = "checkpoint.safetensors"
SUMMARY = "summary.json"
EVALUATION = "evaluation.json"
AUDIT = "audit.json"
SKIPPED = "skipped.csv"
ONNX = "model.onnx"
REPORT = "report.html"
#: what graft wrote in the folder (relative names); --force removes these and nothing else
MANIFEST = "graft-files.json"

#: where --force keeps the run it replaces until the new run can take its place
REPLACED = ".graft-replaced"

# Run-folder files graft owns; --force removes exactly these, never anything else.
RUN_FILES = (
    CONFIG,
    SPLIT,
    HISTORY,
    MODEL,
    SUMMARY,
    SKIPPED,
    "learning_curves.png",
    "class_counts.png",
    "confusion_matrix.png",
    EVALUATION,
    ONNX,
    ONNX + ".json",  # the sha256 of the weights the ONNX graph was made from
    CHECKPOINT,
    AUDIT,
    "leakage_pairs.png",
    "reliability.png",
    "top_losses.png",
    "familiarity.png",  # graft evaluate --others: in-class vs others histogram
    REPORT,
)


@dataclass
class EpochRecord:
    """One row of ``history.csv``."""

    stage: str
    epoch: int  # within its stage, from 1
    step: int  # across both stages, from 1: the curves' time axis
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    # on the --unseen folder (images from elsewhere); used for no choice but 'unknown'
    unseen_loss: float = math.nan
    unseen_acc: float = math.nan
    # the L2 strength of a linear-probe row (graft.probe: stage 1 solved, not trained)
    l2: float = math.nan

    FIELDS = (
        "stage",
        "epoch",
        "step",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "unseen_loss",
        "unseen_acc",
        "l2",
    )


class Summary(TypedDict, total=False):
    """``summary.json``: what a finished training run reports (written by graft.train)."""

    classes: list[str]
    counts: dict[str, int]
    split: dict[str, int]
    skipped_files: int
    class_weights: str
    engine: str
    plan: str
    best: dict[str, Any]
    kept: str
    backbone_choice: dict[str, Any] | None
    unseen: dict[str, Any] | None
    diagnosis: dict[str, Any]
    class_shares: dict[str, dict[str, float]]  # class -> subset -> share of its images
    share_warnings: list[str]  # classes whose val/test share is outside the bounds
    audit: dict[str, Any] | None
    test: dict[str, Any]
    open_set: dict[str, Any]
    calibration: dict[str, Any]
    timings: dict[str, float]
    timings_of: str  # "the whole run", or "the continuation (--resume)"
    epoch_seconds: dict[str, float]
    wise: dict[str, Any] | None  # the weight-space mix (graft.wise), when --wise is on


def _plain_name(name: str) -> bool:
    """An entry directly in the run folder (a manifest never points outside it)."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _graft_name(name: str) -> bool:
    """A name a training run writes: its files, the manifest, ``tensorboard/``, a
    half-written ``.*.tmp`` (``eval-*/`` folders are claimed by ``graft evaluate`` itself)."""
    return (
        name in RUN_FILES
        or name in (MANIFEST, "tensorboard")
        or (name.startswith(".") and name.endswith(".tmp"))
    )


@dataclass(frozen=True)
class RunDir:
    """A run folder (it need not exist yet)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ file names
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def split(self) -> Path:
        return self.path / SPLIT

    @property
    def history(self) -> Path:
        return self.path / HISTORY

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def evaluation(self) -> Path:
        return self.path / EVALUATION

    @property
    def audit(self) -> Path:
        return self.path / AUDIT

    @property
    def onnx(self) -> Path:
        return self.path / ONNX

    @property
    def report(self) -> Path:
        return self.path / REPORT

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        """Its training ended: summary.json is written last, after calibration and the
        evaluation on the test split."""
        return self.summary.is_file()

    @property
    def unfinished(self) -> bool:
        """Training started here (config.json) but did not end: the folder holds the last
        kept epoch, uncalibrated; ``graft train --resume`` finishes it."""
        return self.config.is_file() and not self.finished

    # ------------------------------------------------------------------ creating
    def prepare(self, force: bool) -> list[str]:
        """Create the folder for a new run and return the names already in it (the user's,
        kept). An existing non-empty folder is used only with ``force``, and only if it is a
        graft run: then exactly the files graft wrote there are removed."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunExistsError(f"{out} exists and is a file. Choose another --out.")
        if out.exists() and any(out.iterdir()):
            if not force:
                raise RunExistsError(
                    f"Run folder {out} already exists and is not empty. Choose another --out, "
                    "or pass --force to replace the run in it."
                )
            owned = self.owned()
            clash = [n for n in RUN_FILES if (out / n).exists()]
            if owned is None and clash:
                raise RunExistsError(
                    f"{out} is not a graft run folder (no {CONFIG}, no {MANIFEST}) but holds "
                    f"files with graft's names ({', '.join(clash[:4])}), so --force will not "
                    "touch it. Choose another --out."
                )
            # The run being replaced is set aside, not removed, until the new one can take
            # its place (:meth:`drop_replaced`, :meth:`restore_replaced`): an interrupted
            # --force must not leave the folder with neither.
            aside = out / REPLACED
            names = [*(owned or []), MANIFEST]  # only other files: nothing moves
            if aside.is_dir() and not (self.checkpoint.is_file() or self.finished):
                # a replacement killed before its first checkpoint: what it set aside is
                # still the run to keep; its own files go
                for name in names:
                    self._remove(name)
            else:
                self._remove(REPLACED)  # (one a finished replacement did not get to drop)
                for name in names:
                    if (out / name).exists() or (out / name).is_symlink():
                        aside.mkdir(exist_ok=True)
                        (out / name).replace(aside / name)
            for leftover in out.glob(".*.tmp"):  # half-written files of a killed run
                leftover.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        return sorted(p.name for p in out.iterdir())

    def drop_replaced(self) -> None:
        """The new run has taken the folder: the run --force replaced is removed."""
        self._remove(REPLACED)

    def restore_replaced(self) -> None:
        """The new run left nothing (:meth:`discard_new` removed it): the run --force was
        replacing is put back as it was."""
        aside = self.path / REPLACED
        if not aside.is_dir():
            return
        for entry in aside.iterdir():
            entry.replace(self.path / entry.name)
        aside.rmdir()

    def owned(self) -> list[str] | None:
        """The names graft wrote here: the manifest's, or for a run made before manifests
        existed, graft's own file names; None when the folder is not a graft run."""
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                names = read_json(manifest)["files"]
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    # plus graft's own names (model.onnx is made later, by predict)
                    ours = [n for n in RUN_FILES if (self.path / n).exists()]
                    return sorted({*ours, *(n for n in names if _plain_name(n))})
            except (OSError, ValueError, KeyError, TypeError):
                pass
            raise RunFolderError(
                f"{manifest} is damaged: graft cannot tell its files from yours, so it removes "
                "nothing. Empty the folder yourself or choose another --out."
            )
        if self.config.is_file():
            return [n for n in RUN_FILES if (self.path / n).exists()]
        return None

    def evaluations(self) -> list[Path]:
        """The ``eval-*/evaluation.json`` files graft evaluate wrote here (a folder of that
        name the user made is not graft's, and not its results)."""
        found = sorted(self.path.glob("eval-*/evaluation.json"))
        if not (self.path / MANIFEST).is_file():
            return found  # a run from before manifests: every eval folder was graft's
        owned = set(self.owned() or [])
        return [p for p in found if p.parent.name in owned]

    def claim(self, names: list[str]) -> None:
        """Record ``names`` (entries of this folder graft has just written) in the manifest."""
        known = self.owned() if (self.path / MANIFEST).is_file() else []
        merged = sorted({*(known or []), *(n for n in names if _plain_name(n))})
        atomic_write_json(self.path / MANIFEST, {"files": merged})

    def claim_new(self, before: list[str]) -> None:
        """Record the entries with graft's names that appeared since ``before`` (a file the
        user adds while a run trains is the user's, whatever it is)."""
        keep = {*before, MANIFEST}
        self.claim(
            [p.name for p in self.path.iterdir() if p.name not in keep and _graft_name(p.name)]
        )

    def discard_new(self, before: list[str], created: bool) -> None:
        """Undo a run that failed before training began: remove what it wrote (and the
        folder, when this run created it), so the corrected command needs no --force."""
        keep = set(before)
        for p in list(self.path.iterdir()) if self.path.is_dir() else []:
            if p.name not in keep and _graft_name(p.name):
                self._remove(p.name)
        if created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def _remove(self, name: str) -> None:
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading and writing
    def _read(self, path: Path, what: str) -> Any:
        if not path.is_file():
            raise RunFolderError(
                f"{self.path} has no {path.name}: it is not a finished graft run ({what})."
            )
        try:
            return read_json(path)
        except (OSError, ValueError) as exc:
            raise RunFolderError(f"{path} is unreadable ({exc}); train the run again.") from exc

    def read_config(self) -> dict[str, Any]:
        """``config.json``: the TrainConfig's fields plus what the run found (data root,
        classes, weights source, plan, versions)."""
        return self._read(self.config, "made by `graft train`")  # type: ignore[no-any-return]

    def write_config(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.config, data)

    def read_summary(self) -> Summary:
        return self._read(self.summary, "its training did not finish")  # type: ignore[no-any-return]

    def write_summary(self, summary: Summary) -> None:
        atomic_write_json(self.summary, summary)

    def read_optional(self, name: str) -> Any:
        """A JSON file of the run that may be absent (``audit.json``, ``evaluation.json``)."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except (OSError, ValueError) as exc:
            raise RunFolderError(f"{path} is unreadable ({exc}); train the run again.") from exc

    def write_history(self, history: list[EpochRecord]) -> None:
        fields = EpochRecord.FIELDS
        if not any(math.isfinite(r.unseen_acc) for r in history):
            fields = tuple(f for f in fields if not f.startswith("unseen_"))
        if not any(math.isfinite(r.l2) for r in history):
            fields = tuple(f for f in fields if f != "l2")
        lines = [",".join(fields)]
        for r in history:
            values = [getattr(r, f) for f in fields]
            lines.append(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values))
        atomic_write_text(self.history, "\n".join(lines) + "\n")

    def write_skipped(self, skipped: list[tuple[Path, str]]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "reason"])
        for p, reason in skipped:
            writer.writerow([str(p), reason])
        atomic_write_text(self.path / SKIPPED, buf.getvalue())

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_json(self.path / name, data)
