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

__all__ = ["RUN_FILES", "EpochRecord", "RunDir", "Summary"]

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
    CHECKPOINT,
    AUDIT,
    "leakage_pairs.png",
    "reliability.png",
    "top_losses.png",
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
    # on the --unseen folder (images from elsewhere); never used to choose anything
    unseen_loss: float = math.nan
    unseen_acc: float = math.nan

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
    epoch_seconds: dict[str, float]


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

    # ------------------------------------------------------------------ creating
    def prepare(self, force: bool) -> None:
        """Create the folder for a new run; an existing non-empty one only with ``force``,
        and then only graft's own files are removed."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunExistsError(f"{out} exists and is a file. Choose another --out.")
        if out.exists() and any(out.iterdir()):
            if not force:
                raise RunExistsError(
                    f"Run folder {out} already exists and is not empty. Choose another --out, "
                    "or pass --force to replace the run in it."
                )
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "predictions", ignore_errors=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)

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
        return read_json(path) if path.is_file() else None

    def write_history(self, history: list[EpochRecord]) -> None:
        fields = EpochRecord.FIELDS
        if not any(math.isfinite(r.unseen_acc) for r in history):
            fields = tuple(f for f in fields if not f.startswith("unseen_"))
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
