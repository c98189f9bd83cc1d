"""One self-contained HTML report per run: everything a reader needs to judge the model.

    graft report RUN_DIR            (also written at the end of `graft train`)

Reads only the run folder (summary, audit, evaluation, history, plots) and embeds every image
as base64, so the file can be mailed or opened on a phone with nothing else beside it.
The page itself is ``templates/report.html.j2``; this module only gathers what it shows.
"""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, UndefinedError
from markupsafe import Markup

from .errors import RunFolderError
from .io import atomic_write_text, display, read_json
from .rundir import RunDir

#: the plots the report embeds, by file stem in the run folder; a missing one is left out
FIGURES = (
    "class_counts",
    "leakage_pairs",
    "learning_curves",
    "confusion_matrix",
    "reliability",
    "top_losses",
    "unseen_predictions",
    "familiarity",  # graft evaluate RUN --others DIR: in-class vs others scores
)

#: the settings listed under Configuration, in this order
CONFIG_KEYS = (
    "backbone",
    "img_size",
    "head",
    "head_solver",
    "epochs",
    "lr",
    "batch_size",
    "schedule",
    "fine_tune_epochs",
    "fine_tune_lr",
    "fine_tune_batch_size",
    "unfreeze",
    "trim",
    "detail_size",
    "augment",
    "views",
    "fine_tune_head_lr",
    "l2sp",
    "wise",
    "unseen",
    "class_weights",
    "group_by",
    "test_size",
    "val_size",
    "seed",
)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _fixed(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def _printable(value: Any) -> Any:
    # Paths and class names may hold bytes that are not UTF-8 (surrogate escapes): print them as
    # U+FFFD rather than fail to write the file. Markup (macro output) is already HTML.
    return value if isinstance(value, Markup) else display(value)


@cache
def template_environment(html: bool = True) -> Environment:
    """graft's jinja2 templates (``graft/templates``), for the HTML report (escaped) or the
    Markdown model card (``html=False``)."""
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        # HTML: class names, paths and notes come from the user's files and must stay text
        autoescape=html,
        finalize=_printable if html else None,
        undefined=StrictUndefined,  # a misspelt key fails loudly instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(pct=_pct, fixed=_fixed)
    return env


def _png(path: Path) -> str | None:
    """A plot as base64 PNG data, or None where there is no such file."""
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _figures(run: Path) -> dict[str, str | None]:
    """Each plot as base64 PNG data, or None where the run has no such plot."""
    return {name: _png(run / f"{name}.png") for name in FIGURES}


def _with_measured(config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """``config`` with what ``auto`` came to where the summary says (the detail size)."""
    measured = summary.get("detail_size")
    if config.get("detail_size") == "auto" and isinstance(measured, int):
        config = {**config, "detail_size": f"auto: {measured} px" if measured else "auto: none"}
    return config


def _report_context(run: Path) -> dict[str, Any]:
    """The values ``report.html.j2`` shows, read from the run folder."""
    rundir = RunDir(run)
    summary, config = rundir.read_summary(), rundir.read_config()
    for path, data in ((rundir.summary, summary), (rundir.config, config)):
        if not isinstance(data, dict):
            raise _damaged(path, "it is not a JSON object")
    numbers = ("img_size", "seed", "test_size", "val_size")
    bad = [k for k in numbers if not _is_number(config.get(k))]
    bad += [k for k in ("backbone", "data_root") if not isinstance(config.get(k), str)]
    if bad:
        raise _damaged(rundir.config, f"{', '.join(bad)} missing or of the wrong type")
    config = _with_measured(config, summary)
    return {
        "title": f"graft run: {run.name}",
        "summary": summary,
        "config": config,
        "diag": summary.get("diagnosis"),
        "audit": _read_optional(rundir.audit),
        "ev": _read_optional(rundir.evaluation),
        # `graft evaluate RUN FOLDER` results on images from elsewhere, each with its
        # --others histogram when it has one
        "extra": [
            (_read_optional(p), _png(p.parent / "familiarity.png"))
            for p in RunDir(run).evaluations()
        ],
        # what the model's "unknown" rule is made of (graft.familiarity), for the Open set text
        "familiarity": (summary.get("calibration") or {}).get("familiarity"),
        "figures": _figures(run),
        "settings": [(key, config.get(key)) for key in CONFIG_KEYS],
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _damaged(path: Path, detail: str) -> RunFolderError:
    return RunFolderError(
        f"{path.name} in {path.parent} is damaged: {detail}. It was changed after graft wrote "
        "it: restore it, or run the command that writes it again (`graft train`, "
        "`graft evaluate`)."
    )


def _read_optional(path: Path) -> dict[str, Any] | None:
    """A JSON object the run may lack (audit.json, evaluation.json): None when absent."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise _damaged(path, f"it is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _damaged(path, "it is not a JSON object")
    return data


#: what a run file of the wrong shape (valid JSON, unexpected content) raises in the template
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, UndefinedError)


def build_report(run: str | Path) -> str:
    run = Path(run)
    template = template_environment().get_template("report.html.j2")
    context = _report_context(run)
    try:
        return template.render(context)
    except _SHAPE_ERRORS as exc:
        path, detail = _culprit(run, template, context)
        raise _damaged(path, f"{detail} ({type(exc).__name__}: {exc})") from exc


def _culprit(run: Path, template: Any, context: dict[str, Any]) -> tuple[Path, str]:
    """Which file made the report fail, found by leaving out the optional ones in turn."""
    rundir = RunDir(run)
    extras = RunDir(run).evaluations()
    trials: list[tuple[Path, dict[str, Any]]] = [
        (rundir.audit, {"audit": None}),
        (rundir.evaluation, {"ev": None}),
    ]
    for i, path in enumerate(extras):
        trials.append((path, {"extra": [e for j, e in enumerate(context["extra"]) if j != i]}))
    for path, change in trials:
        try:
            template.render({**context, **change})
        except _SHAPE_ERRORS:
            continue
        return path, "its content does not have the shape graft writes"
    return rundir.summary, "its content does not have the shape graft writes"


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run)
    target = Path(out) if out else RunDir(run).report
    atomic_write_text(target, build_report(run))
    return target
