"""What a Jupyter notebook shows: progress bars, and compact HTML summaries of a classifier
and of an evaluation (``_repr_html_``, used when one is the last value of a cell).

rich draws its live progress bars only on a terminal; in a notebook it needs ipywidgets. A
display handle of IPython (``display(..., display_id=True)``) updates one HTML output in
place with nothing else installed, in Jupyter, JupyterLab, VS Code and Colab alike.

Every class name, path and message passes through :func:`html.escape`: a class folder
named ``<script>`` is shown, never run. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: figures larger than this on disk stay out of the HTML
MAX_INLINE_IMAGE_BYTES = 4 * 1024 * 1024
#: the width of an inline figure on the page, in CSS pixels
IMAGE_WIDTH = 340
#: a summary lists at most this many classes (the run folder has them all)
MAX_CLASSES_SHOWN = 30
#: the least time between two updates of a bar: each one is a message to the front end
MIN_UPDATE_SECONDS = 0.2

_STYLE = (
    "<style>.graft-summary table{border-collapse:collapse;margin:0.3em 0}"
    ".graft-summary th,.graft-summary td{text-align:left;padding:0.15em 0.6em;"
    "vertical-align:top}.graft-summary td.num{text-align:right}"
    ".graft-summary caption{text-align:left;padding:0.2em 0}"
    ".graft-summary th{white-space:nowrap}"
    ".graft-summary img{margin:0.2em 0.4em 0 0;vertical-align:top}</style>"
)


def esc(value: object) -> str:
    """Text for HTML, quotes included (it also lands in attributes)."""
    return html.escape(str(value), quote=True)


def _pct(x: float) -> str:
    return f"{x:.1%}" if isinstance(x, int | float) and math.isfinite(x) else "-"


def _interval(ci: object) -> str:
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return f" (95% CI {_pct(ci[0])}-{_pct(ci[1])})"
    return ""


def _image(path: Path, alt: str) -> str:
    """A PNG inline, scaled down to what the page shows (at twice the pixels, for sharp
    high-density screens): a notebook keeps every output in its file. Nothing when the
    figure is missing, unreadable or too large."""
    import io

    from PIL import Image

    try:
        if not path.is_file() or path.stat().st_size > MAX_INLINE_IMAGE_BYTES:
            return ""
        with Image.open(path) as im:
            im.thumbnail((2 * IMAGE_WIDTH, 2 * IMAGE_WIDTH))
            # a chart has few colours: a palette of 128 makes the file a quarter the size
            small = im.convert("RGB").quantize(128)
            buffer = io.BytesIO()
            small.save(buffer, format="PNG", optimize=True)
    except (OSError, ValueError):  # Pillow's errors for a damaged file are OSErrors
        return ""
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}" title="{esc(alt)}" '
        f'style="max-width:{IMAGE_WIDTH}px">'
    )


def _rows(rows: list[tuple[str, str]]) -> str:
    """``(header, cell HTML)`` pairs as table rows; the cell is HTML already escaped."""
    return "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows if v)


def _classes(classes: list[str]) -> str:
    shown = ", ".join(esc(c) for c in classes[:MAX_CLASSES_SHOWN])
    more = len(classes) - MAX_CLASSES_SHOWN
    return f"{shown}{f', and {more} more' if more > 0 else ''} ({len(classes)})"


def _read_json(path: Path) -> dict[str, Any]:
    """A run's JSON file for display: anything missing or damaged shows as nothing (a
    summary in a notebook never raises; graft evaluate and predict say what is wrong)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def params_text(params: Mapping[str, Any]) -> str:
    """``name=value`` pairs, as a repr lists them."""
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def classifier_html(
    name: str, changed: Mapping[str, Any], run_dir: Path | None, classes: list[str]
) -> str:
    """A classifier at a glance: its classes, held-out accuracy with its interval, the
    split, the diagnosis, the run folder, the parameters it does not take by default and
    the learning curves and confusion matrix. ``run_dir`` None: not fitted yet."""
    params = esc(params_text(changed)) or "all defaults"
    if run_dir is None:
        caption = f"<b>{esc(name)}</b>, not fitted: call fit(folder) or load(run_dir)"
        return _summary(caption, _rows([("parameters", params)]))
    summary = _read_json(run_dir / "summary.json")
    config = _read_json(run_dir / "config.json")
    test, split = _dict(summary.get("test")), _dict(summary.get("split"))
    rows = [
        ("classes", _classes(classes)),
        (
            "held-out test",
            f"accuracy {_pct(test['accuracy'])}{_interval(test.get('accuracy_ci95'))} on "
            f"{test.get('n', '?')} images"
            if "accuracy" in test
            else "",
        ),
        ("split", esc(" / ".join(f"{k} {v}" for k, v in split.items()))),
        ("diagnosis", esc(_dict(summary.get("diagnosis")).get("verdict", ""))),
        ("run folder", f"<code>{esc(run_dir)}</code>"),
        ("parameters", params),
    ]
    backbone = config.get("backbone") or changed.get("backbone") or ""
    caption = f"<b>{esc(name)}</b> {esc(backbone)}, fitted"
    plots = _image(run_dir / "learning_curves.png", "learning curves") + _image(
        run_dir / "confusion_matrix.png", "confusion matrix (held-out test split)"
    )
    return _summary(caption, _rows(rows), plots)


def _per_class(per_class: Mapping[str, Any]) -> str:
    head = "".join(
        f"<th>{h}</th>" for h in ("class", "precision", "recall", "recall 95% CI", "F1", "n")
    )
    body = []
    for name, m in list(per_class.items())[:MAX_CLASSES_SHOWN]:
        if not m.get("support"):
            cells = ["-", "-", "-", "-", "0"]
        else:
            lo, hi = m.get("recall_ci95", (math.nan, math.nan))
            cells = [
                f"{m['precision']:.3f}",
                f"{m['recall']:.3f}",
                f"{lo:.2f}-{hi:.2f}",
                f"{m['f1']:.3f}",
                str(m["support"]),
            ]
        nums = "".join(f'<td class="num">{c}</td>' for c in cells)
        body.append(f"<tr><td>{esc(name)}</td>{nums}</tr>")
    more = len(per_class) - MAX_CLASSES_SHOWN
    if more > 0:
        body.append(f'<tr><td colspan="6">and {more} more classes: evaluation.json</td></tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def evaluation_html(result: Mapping[str, Any]) -> str:
    """An evaluation at a glance: accuracy with its interval, loss, calibration, the open
    set, the classes, the most confused pairs and the confusion matrix."""
    out = Path(result["output_dir"]) if result.get("output_dir") else None
    rows = [
        (
            "accuracy",
            f"{_pct(result.get('accuracy', math.nan))}{_interval(result.get('accuracy_ci95'))}"
            f" on {result.get('n', '?')} images",
        ),
        ("loss", f"{result['loss']:.3f}" if "loss" in result else ""),
        ("macro F1", f"{result['macro_f1']:.3f}" if "macro_f1" in result else ""),
        ("calibration error", _ece(result)),
        ("with 'unknown'", _open_set(result.get("open_set") or {})),
        ("most confused", _confused(result.get("most_confused") or [])),
        (
            "skipped",
            esc(f"{len(result['failed'])} unreadable image(s)") if result.get("failed") else "",
        ),
        ("folder", f"<code>{esc(out)}</code>" if out else ""),
    ]
    caption = f"<b>Evaluation</b> on the {esc(result.get('data', 'images'))}"
    plots = _image(out / "confusion_matrix.png", "confusion matrix") if out else ""
    table = _rows(rows)
    per_class = _per_class(result["per_class"]) if result.get("per_class") else ""
    return _summary(caption, table, per_class + plots)


def _ece(result: Mapping[str, Any]) -> str:
    ece = (result.get("calibration") or {}).get("ece")
    return f"{ece:.3f}" if isinstance(ece, int | float) else ""


def _open_set(o: Mapping[str, Any]) -> str:
    if not o or (o.get("threshold", 0) <= 0 and "familiarity_threshold" not in o):
        return ""
    return (
        f"{_pct(o.get('coverage', math.nan))} answered, "
        f"{_pct(o.get('answered_accuracy', math.nan))} of those right"
    )


def _confused(pairs: list[Mapping[str, Any]]) -> str:
    return "; ".join(
        f"{esc(c['true'])} taken for {esc(c['predicted'])} ({int(c['count'])}x)" for c in pairs[:5]
    )


def _summary(caption: str, rows: str, extra: str = "") -> str:
    return (
        f'{_STYLE}<div class="graft-summary"><table><caption>{caption}</caption>{rows}'
        f"</table>{extra}</div>"
    )


class EvaluationResult(dict[str, Any]):
    """``evaluation.json`` as :meth:`graft.ImageClassifier.evaluate` returns it: a plain dict
    (``result["accuracy"]``), shown as a compact table when it ends a notebook cell."""

    def _repr_html_(self) -> str:
        return evaluation_html(self)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class NotebookBar:
    """One progress bar in a notebook: an HTML output updated in place, emptied when the
    work is done (as rich's bar leaves the terminal)."""

    def __init__(self, label: str, total: int):
        from IPython.display import HTML, display

        self._html = HTML
        self.label, self.total, self.done = label, max(int(total), 0), 0
        self.started = self.shown = time.monotonic()
        self.handle = display(HTML(self.render()), display_id=True)

    def render(self) -> str:
        elapsed = time.monotonic() - self.started
        left = ""
        if 0 < self.done < self.total:
            left = f", {_clock(elapsed / self.done * (self.total - self.done))} left"
        return (
            f'<div class="graft-progress">{esc(self.label)} '
            f'<progress value="{self.done}" max="{max(self.total, 1)}" '
            'style="width:18em;vertical-align:middle"></progress> '
            f"{self.done}/{self.total} ({_clock(elapsed)}{left})</div>"
        )

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown >= MIN_UPDATE_SECONDS or self.done >= self.total:
            self.shown = now
            self.handle.update(self._html(self.render()))

    def close(self) -> None:
        self.handle.update(self._html(""))


@contextmanager
def notebook_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """``with notebook_bar("Training", n) as advance: ... advance(k)``."""
    bar = NotebookBar(label, total)
    try:
        yield bar.advance
    finally:
        bar.close()
