"""Predictions and where they go: :class:`Prediction`, the methods every predictor shares
(:class:`ScorePredictor`: from per-batch scores to ranked answers with "unknown"), and
streaming them to a ``.jsonl`` / ``.csv`` file that an interrupted call continues.

Torch-free: graft.fast predicts from a run's ONNX export with these, without torch; the
PyTorch :class:`graft.predict.Predictor` uses the same ones.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GraftError, SystemResourceError, UsageError, os_error_message
from .runtime import rank_classes, unknown_reason


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first
    error: str | None = None
    unknown: bool = False  # below the run's confidence or familiarity threshold
    familiarity: float | None = None  # graft.familiarity; None when the model has none
    unknown_reason: str = ""  # "unfamiliar" or "unsure" when unknown (runtime.unknown_reason)

    @property
    def label(self) -> str | None:
        if not self.top:
            return None
        return "unknown" if self.unknown else self.top[0][0]

    def to_dict(self) -> dict:
        out: dict = {"path": self.path}
        if self.error:
            out["error"] = self.error
        else:
            out["label"] = self.label
            out["top"] = [{"class": c, "probability": round(p, 6)} for c, p in self.top]
            if self.familiarity is not None:
                out["familiarity"] = round(self.familiarity, 6)
            if self.unknown:
                out["unknown_reason"] = self.unknown_reason
        return out


NON_FINITE = (
    "the model produced non-finite scores (NaN or infinity): the run's weights are broken; "
    "retrain it"
)


def check_count(name: str, value: object) -> int:
    """``value`` as a count of at least 1 (a batch size, a top-k), or a UsageError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise UsageError(f"{name} must be a whole number of 1 or more, not {value!r}.")
    return int(value)


class ScorePredictor:
    """What a predictor does once it can score a batch of files (:meth:`iter_scores`, which a
    subclass provides): probabilities, familiarity, ranked answers and "unknown"."""

    classes: list[str]
    unknown_threshold: float
    familiarity_threshold: float
    has_familiarity: bool

    def iter_scores(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[int, str]]]:
        """Batch by batch, in order: (indices into ``paths``, their probabilities, their
        familiarity or None, ``{index: reason}`` for files that could not be read or got
        non-finite scores)."""
        raise NotImplementedError

    def _empty(
        self, failed: dict[int, str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[int, str]]:
        """What :meth:`iter_scores` yields for a batch of which no file could be read."""
        familiarity = np.zeros(0) if self.has_familiarity else None
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(self.classes))), familiarity, failed

    @staticmethod
    def _finite(
        index: np.ndarray,
        probs: np.ndarray,
        familiarity: np.ndarray | None,
        failed: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[int, str]]:
        """A scored batch with non-finite rows moved to ``failed``: never report NaN as a
        probability."""
        finite = np.isfinite(probs).all(axis=1)
        if familiarity is not None:
            finite &= np.isfinite(familiarity)
        if not finite.all():
            failed.update({int(i): NON_FINITE for i in index[~finite]})
            index, probs = index[finite], probs[finite]
            familiarity = None if familiarity is None else familiarity[finite]
        return index, probs, familiarity, failed

    def iter_proba(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, str]]]:
        """:meth:`iter_scores` without the familiarity."""
        for index, probs, _, failed in self.iter_scores(paths, batch_size):
            yield index, probs, failed

    def predict_scores(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray | None, dict[int, str]]:
        """Probabilities ``[len(paths), n_classes]`` and familiarity ``[len(paths)]`` (or
        None) with NaN rows for failures, and ``{index: reason}`` for files that could not
        be read or predicted."""
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        fam = np.full(len(paths), np.nan, dtype=np.float32) if self.has_familiarity else None
        failed: dict[int, str] = {}
        for index, p, f, bad in self.iter_scores(paths, batch_size):
            probs[index] = p
            if fam is not None and f is not None:
                fam[index] = f
            failed.update(bad)
        return probs, fam, failed

    def predict_proba(
        self, paths: Sequence[str | Path], batch_size: int = 32
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Probabilities ``[len(paths), n_classes]`` (NaN rows for failures) and
        ``{index: reason}`` for files that could not be read or predicted."""
        probs, _, failed = self.predict_scores(paths, batch_size)
        return probs, failed

    def _prediction(
        self, path: str | Path, p: np.ndarray, familiarity: float | None, top_k: int
    ) -> Prediction:
        top, unknown = rank_classes(
            p,
            self.classes,
            top_k,
            self.unknown_threshold,
            familiarity,
            self.familiarity_threshold,
        )
        fam = None if familiarity is None else float(familiarity)
        reason = ""
        if unknown:
            reason = unknown_reason(
                top[0][1], self.unknown_threshold, fam, self.familiarity_threshold
            )
        return Prediction(str(path), top, unknown=unknown, familiarity=fam, unknown_reason=reason)

    def iter_predict(
        self, paths: Sequence[str | Path], top_k: int = 3, batch_size: int = 32
    ) -> Iterator[list[Prediction]]:
        """Predictions batch by batch, each batch in the order of ``paths``."""
        for index, p, fam, failed in self.iter_scores(paths, batch_size):
            rows = {
                int(i): self._prediction(paths[i], p[r], None if fam is None else fam[r], top_k)
                for r, i in enumerate(index)
            }
            rows.update({i: Prediction(str(paths[i]), [], why) for i, why in failed.items()})
            yield [rows[i] for i in sorted(rows)]

    def predict(
        self, paths: Sequence[str | Path], top_k: int = 3, batch_size: int = 32
    ) -> list[Prediction]:
        return [p for batch in self.iter_predict(paths, top_k, batch_size) for p in batch]


# --------------------------------------------------------------------------- streaming


@dataclass
class StreamStats:
    written: int  # predictions written by this call
    skipped: int  # already in the file from an earlier, interrupted call
    failed: int  # files that could not be read (written with their reason)
    seconds: float
    #: of the skipped, those an earlier call could not read (their rows are errors): a
    #: continued call that wrote no error itself still leaves them in the file
    failed_before: int = 0

    @property
    def per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def csv_header(k: int) -> list[str]:
    """The columns of predictions as CSV (``graft predict --csv`` and ``--out FILE.csv``):
    ``familiarity`` is empty for a model without the score (graft.familiarity)."""
    header = ["path", "label", "error", "familiarity"]
    for i in range(1, k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    return header


def csv_row(prediction: Prediction, k: int) -> list[str]:
    """One prediction under :func:`csv_header` ``(k)``: ``label`` is the answer or
    ``unknown`` (empty when the file could not be read); rows with fewer than ``k``
    classes are padded with empty cells."""
    p = prediction
    familiarity = "" if p.familiarity is None else f"{p.familiarity:.6f}"
    row = [p.path, p.label or "", p.error or "", familiarity]
    for c, prob in p.top[:k]:
        row += [c, f"{prob:.6f}"]
    return row + [""] * (len(csv_header(k)) - len(row))


#: where each format of ``--out`` is recognised, by file name ending
OUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_JSONL_START = '{"path": '


def _not_ours(out: Path, why: str, line: int | None = None) -> UsageError:
    todo = (
        f"Fix or delete line {line} (its image is then predicted again), or give --out a "
        "new file name."
        if line
        else "Give --out a new file name (or the file an earlier `graft predict --out` "
        "wrote, to continue it)."
    )
    return UsageError(f"{out} {why}; graft left it unchanged. {todo}")


def _is_prediction(row: object) -> bool:
    """A JSON Lines row as :meth:`Prediction.to_dict` writes it."""
    return (
        isinstance(row, dict)
        and isinstance(row.get("path"), str)
        and ("error" in row or ("label" in row and isinstance(row.get("top"), list)))
    )


def _jsonl_paths(out: Path, lines: list[str]) -> dict[str, bool]:
    done: dict[str, bool] = {}
    bad: list[int] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if _is_prediction(row):
            done[row["path"]] = bool(row.get("error"))
        else:
            bad.append(number)
    if bad and not done:
        raise _not_ours(out, "was not written by `graft predict` (not its JSON Lines)")
    if bad:  # graft's file, damaged: a line torn or edited by hand
        raise _not_ours(out, f"has a damaged line {bad[0]} (torn or edited)", bad[0])
    return done


def _csv_paths(out: Path, text: str, header: list[str]) -> dict[str, bool]:
    reader = csv.reader(io.StringIO(text))
    first = next(reader, None)
    if first is not None and first != header:
        if first[:3] != header[:3]:
            raise _not_ours(
                out, "was not written by `graft predict` (its first line is not graft's header)"
            )
        why = (
            "by a graft from before the familiarity column; it cannot be continued"
            if "familiarity" not in first
            else "use the same --top-k as that call"
        )
        raise _not_ours(
            out, f"was written with other columns ({len(first)}, not {len(header)}): {why}"
        )
    done: dict[str, bool] = {}
    for row in reader:
        if len(row) != len(header):
            raise _not_ours(
                out,
                f"has a damaged line {reader.line_num} ({len(row)} columns, not "
                f"{len(header)}; torn or edited)",
                reader.line_num,
            )
        done[row[0]] = bool(row[2])  # the error column
    return done


def _torn_tail_ok(tail: str, fmt: str, header: list[str]) -> bool:
    """Whether the text after the last newline can be the start of a line graft was writing
    when it was interrupted (and so may be cut off)."""
    if fmt == "jsonl":
        return tail.startswith(_JSONL_START) or _JSONL_START.startswith(tail)
    rows = list(csv.reader(io.StringIO(tail)))
    return len(rows) <= 1 and all(len(r) <= len(header) for r in rows)


def existing_results(out: Path, fmt: str, header: list[str]) -> tuple[dict[str, bool], int]:
    """The paths an earlier ``graft predict --out`` already wrote to ``out`` (each with
    whether its row is an error: the file could not be read), and how many bytes of it to
    keep (less than its size when the last line was torn by a crash).

    Reads only: a file that is not graft's own (another header, lines that are not
    predictions, a damaged line in the middle) is refused with a UsageError before
    anything is written, so a user's file is never changed."""
    try:
        if not out.exists():
            return {}, 0
        if not out.is_file():
            raise UsageError(f"--out {out} is not a file (a folder?): give a file name.")
        raw = out.read_bytes()
    except OSError as exc:
        raise _os_error(exc, f"read {out}") from exc
    keep = raw.rfind(b"\n") + 1
    text = raw[:keep].decode("utf-8", errors="surrogateescape")
    tail = raw[keep:].decode("utf-8", errors="surrogateescape")
    if fmt == "jsonl":
        done = _jsonl_paths(out, text.splitlines())
    else:
        done = _csv_paths(out, text, header)
    if tail and not _torn_tail_ok(tail, fmt, header):
        raise _not_ours(out, "does not end like a file `graft predict` was writing")
    if tail and not text and fmt == "csv" and not ",".join(header).startswith(tail):
        raise _not_ours(
            out, "was not written by `graft predict` (its first line is not graft's header)"
        )
    return done, keep


def _os_error(exc: OSError, action: str) -> GraftError:
    message = os_error_message(exc, action)
    if message:
        return SystemResourceError(message)
    return UsageError(f"Could not {action}: {exc.strerror or exc}. Choose another --out.")


def _stamp_path(out: Path) -> Path:
    real = Path(os.path.realpath(out))  # beside the file itself, however --out reaches it
    return real.with_name(f".{real.name}.graft.json")


def _where(path: str, base: str) -> str:
    """The file ``path`` names, read against ``base``: symbolic links resolved, so that
    `link/a.png` and `big/a.png` are one file and `link/../big` goes where the system goes."""
    return os.path.realpath(os.path.join(base, path))


def _read_stamp(out: Path) -> dict[str, Any] | None:
    """What the call that began ``out`` recorded beside it (model, settings, its working
    folder), or None: no stamp, one that cannot be read, or a file from before stamps."""
    try:
        earlier = json.loads(_stamp_path(out).read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) else None


def _still_to_do(
    paths: Sequence[Path], done: dict[str, bool], begun: str | None
) -> tuple[list[Path], int]:
    """The paths whose files the file has no row for, and how many of the others' rows are
    errors (unreadable files). Rows are compared as the files they name: relative rows read
    against the folder the file was ``begun`` in, or the current one when that folder is
    gone (moved together with its file) or unknown. Rows added from another folder than the
    one they are read against name their files absolutely."""
    if not done:
        return list(paths), 0
    here = os.getcwd()
    base = begun if begun is not None and os.path.isdir(begun) else here
    done_at = {_where(d, base): error for d, error in done.items()}
    todo, failed_before = [], 0
    for p in paths:
        error = done_at.get(_where(str(p), here))
        if error is None:
            todo.append(p)
        else:
            failed_before += error
    if begun is None or base != here:
        todo = [Path(os.path.abspath(p)) for p in todo]
    return todo, failed_before


def _check_same_model(out: Path, model: dict[str, Any], earlier: dict[str, Any] | None) -> None:
    """Refuse to continue ``out`` with another model than the one that began it (its
    stamp ``earlier``, a hidden file beside it, says which; None for a new file): the file
    would mix two models' answers."""
    if earlier is None:
        return  # a new file, or one from before stamps: nothing to compare
    # the model's path only names it (a run folder may move); its weights' hash decides
    differs = ", ".join(k for k in model if k != "model" and earlier.get(k) != model[k])
    if differs:
        raise UsageError(
            f"--out {out} holds predictions of another model or setting ({differs} differ: "
            f"begun with {earlier.get('model', '?')}); continuing would mix two models' "
            "answers. Write to a new --out, or delete the file to start it again."
        )


def stream_predictions(
    predictor: ScorePredictor,
    paths: Sequence[Path],
    out: Path,
    top_k: int = 3,
    batch_size: int = 64,
    progress: Any = None,
    model: dict[str, Any] | None = None,
) -> StreamStats:
    """Predict ``paths`` into ``out`` (``.jsonl``/``.ndjson`` or ``.csv``) as they are
    computed.

    Results are flushed batch by batch, so memory stays flat and an interrupted call loses
    at most one batch; calling again with the same file continues where it stopped (paths
    already in the file are skipped, a torn last line is cut off). An existing file that
    graft did not write is refused and left as it was. ``progress(n)`` is called after
    each batch. ``model`` (which model and settings answer, e.g. its weights' hash) is
    stamped beside ``out``, and a later call with another refuses to continue the file.
    """
    out = Path(out)
    batch_size = check_count("batch_size", batch_size)
    top_k = check_count("top_k", top_k)
    fmt = OUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {out}: use a .jsonl, .ndjson or .csv file name.")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"--out {out}: {out.parent} is a file, not a folder.")
    k = min(top_k, len(predictor.classes))
    header = csv_header(k)
    continuing = out.is_file() and out.stat().st_size > 0
    stamp = _read_stamp(out) if continuing else None  # what began the file, if anything
    if model is not None:  # another model first: its file would also differ in columns
        _check_same_model(out, model, stamp)
    done, keep = existing_results(out, fmt, header)  # validates before anything is written
    # the same file however it is spelled (`big/a.png`, `./big/a.png`, `/data/big/a.png`)
    begun = stamp.get("cwd") if stamp is not None else None
    todo, failed_before = _still_to_do(paths, done, begun if isinstance(begun, str) else None)
    started = time.perf_counter()
    written = failed = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_file() and out.stat().st_size > keep:
            with open(out, "r+b") as raw:
                raw.truncate(keep)  # only a torn last line (a crash mid-write) is cut
        fh = open(out, "a", newline="", encoding="utf-8", errors="surrogateescape")
        if model is not None and keep == 0:
            from .io import atomic_write_json

            atomic_write_json(_stamp_path(out), {**model, "cwd": os.getcwd()})
    except OSError as exc:
        raise _os_error(exc, f"write {out}") from exc
    with fh:
        writer = csv.writer(fh, lineterminator="\n") if fmt == "csv" else None
        if writer is not None and keep == 0:
            writer.writerow(header)
        for batch in predictor.iter_predict(todo, top_k, batch_size):
            failed += sum(bool(p.error) for p in batch)
            try:  # a full disk or a file gone read-only mid-way: say so, not "a bug"
                if writer is None:
                    fh.write("".join(json.dumps(p.to_dict()) + "\n" for p in batch))
                else:
                    writer.writerows(csv_row(p, k) for p in batch)
                fh.flush()
            except OSError as exc:
                raise _os_error(exc, f"write {out}") from exc
            written += len(batch)
            if progress is not None:
                progress(len(batch))
    return StreamStats(
        written, len(paths) - len(todo), failed, time.perf_counter() - started, failed_before
    )
