"""One self-contained HTML report per run: everything a reader needs to judge the model.

    graft report RUN_DIR            (also written at the end of `graft train`)

Reads only the run folder (summary, audit, evaluation, history, plots) and embeds every image
as base64, so the file can be mailed or opened on a phone with nothing else beside it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from .io import atomic_write_text, display, read_json

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;
color:#1f2328;line-height:1.45}
main{max-width:980px;margin:0 auto;padding:16px}
h1{font-size:1.5rem;margin:.2em 0}h2{font-size:1.15rem;margin:1.6em 0 .5em;border-bottom:1px
solid #d0d7de;padding-bottom:.2em}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;margin:12px 0}
img{max-width:100%;height:auto;display:block;margin:8px 0}
table{border-collapse:collapse;font-size:.9rem;min-width:60%}
th,td{padding:4px 10px;border-bottom:1px solid #eaeef2;text-align:right}
th:first-child,td:first-child{text-align:left}
.scroll{overflow-x:auto}
.big{font-size:1.6rem;font-weight:600}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 10px;margin:6px 0}
.ok{background:#dafbe1;border:1px solid #4ac26b;border-radius:6px;padding:8px 10px;margin:6px 0}
.muted{color:#59636e;font-size:.85rem}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px}
"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _e(text: Any) -> str:
    return html.escape(display(text))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _metrics_table(ev: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td>{m['recall_ci95'][0]:.2f}–{m['recall_ci95'][1]:.2f}</td><td>{m['f1']:.3f}</td>"
        f"<td>{m['support']}</td></tr>"
        for c, m in ev["per_class"].items()
    )
    return (
        '<div class="scroll"><table><tr><th>class</th><th>precision</th><th>recall</th>'
        f"<th>recall 95% CI</th><th>F1</th><th>images</th></tr>{rows}</table></div>"
    )


def build_report(run: str | Path) -> str:
    run = Path(run)
    summary = read_json(run / "summary.json")
    config = read_json(run / "config.json")
    audit = read_json(run / "audit.json") if (run / "audit.json").is_file() else None
    ev = read_json(run / "evaluation.json") if (run / "evaluation.json").is_file() else None
    diag = summary["diagnosis"]
    parts: list[str] = []
    title = f"graft run: {run.name}"
    parts.append(
        f"<h1>{_e(title)}</h1><p class='muted'>{_e(config['backbone'])} at "
        f"{config['img_size']}px · {len(summary['classes'])} classes · seed {config['seed']} · "
        f"data {_e(config['data_root'])}</p>"
    )
    # headline
    if ev is not None:
        lo, hi = ev["accuracy_ci95"]
        parts.append(
            f"<section><div class='big'>{_pct(ev['accuracy'])} held-out accuracy</div>"
            f"<div>95% interval {_pct(lo)}–{_pct(hi)} on {ev['n']} test images · loss "
            f"{ev['loss']:.3f} · calibration error {ev['calibration']['ece']:.3f}</div>"
            f"<div>Curves say: <b>{_e(diag['verdict'])}</b></div>"
            + "".join(f"<div class='warn'>{_e(n)}</div>" for n in diag.get("notes", []))
            + (
                f"<div class='warn'>Leakage: {audit['straddling_pairs']} near-duplicate pairs "
                "straddle the split, so these numbers overstate accuracy on new images.</div>"
                if audit and audit.get("straddling_pairs")
                else ""
            )
            + "</section>"
        )
    # data
    counts = summary["counts"]
    parts.append("<h2>Data</h2><section>")
    parts.append(
        f"<p>{sum(counts.values())} images in {len(counts)} classes; split "
        + " / ".join(f"{k} {v}" for k, v in summary["split"].items())
        + f". Class weights: {_e(summary['class_weights'])}. "
        f"Skipped files: {summary['skipped_files']} (see skipped.csv).</p>"
    )
    parts.append(_img(run / "class_counts.png", "images per class"))
    if audit is not None:
        parts.append(
            f"<p><b>Duplicate audit</b> (cosine ≥ {audit['threshold']}): "
            f"{audit['exact_duplicate_files']} exact copies, "
            f"{audit['near_duplicate_pairs']} near-duplicate pairs in "
            f"{audit['near_duplicate_clusters']} clusters; grouping: "
            f"{_e(audit['grouping'].rstrip('.'))}.</p>"
        )
        findings = audit.get("findings", [])
        for f in findings:
            parts.append(f"<div class='warn'>{_e(f)}</div>")
        if not findings:
            parts.append("<div class='ok'>No duplicates or leakage found.</div>")
        parts.append(_img(run / "leakage_pairs.png", "duplicate pairs across the split"))
    parts.append("</section>")
    # training
    parts.append("<h2>Training</h2><section>")
    parts.append(
        f"<p>{_e(summary['plan'])}</p><p class='muted'>Engine: {_e(summary['engine'])}."
        f" Kept: epoch {summary['best']['step']} ({_e(summary['best']['stage'])}).</p>"
    )
    parts.append(_img(run / "learning_curves.png", "learning curves"))
    parts.append(f"<p><b>{_e(diag['verdict'])}</b>: {_e(diag['explanation'])}</p>")
    if summary.get("kept"):
        parts.append(f"<p>Kept: {_e(summary['kept'])}.</p>")
    unseen = summary.get("unseen")
    if unseen:
        rows = "".join(
            f"<tr><td>{_e(stage)} (epoch {v['epoch']})</td><td>{_pct(v['val_acc'])}</td>"
            f"<td>{_pct(v['unseen_acc'])}</td></tr>"
            for stage, v in unseen["by_stage"].items()
        )
        parts.append(
            "<p><b>In-domain vs out-of-domain</b> (each stage at its best validation epoch; "
            f"out-of-domain = {_e(unseen['folder'])}, {unseen['n']} images, never used for "
            "choices):</p><div class='scroll'><table><tr><th>stage</th><th>validation "
            f"(in-domain)</th><th>images from elsewhere</th></tr>{rows}</table></div>"
        )
    parts.append("</section>")
    # evaluation
    if ev is not None:
        parts.append("<h2>Held-out test split</h2><section>")
        parts.append(_metrics_table(ev))
        if ev.get("most_confused"):
            parts.append(
                "<p>Most confused: "
                + ", ".join(
                    f"{_e(c['true'])} → {_e(c['predicted'])} ({c['count']})"
                    for c in ev["most_confused"]
                )
                + "</p>"
            )
        o = ev.get("open_set")
        if o and o["threshold"] > 0:
            parts.append(
                f"<p>Open set: below {_pct(o['threshold'])} confidence predict answers "
                f"<i>unknown</i>; on this split {_pct(o['coverage'])} are answered and "
                f"{_pct(o['answered_accuracy'])} of those are right.</p>"
            )
        cal = summary.get("calibration", {})
        parts.append(
            f"<p>Temperature {cal.get('temperature', 1.0):.3f}"
            + ("" if cal.get("fitted", True) else " (not fitted: validation had no errors)")
            + "</p>"
        )
        parts.append(
            "<div class='grid'>"
            + _img(run / "confusion_matrix.png", "confusion matrix")
            + _img(run / "reliability.png", "reliability diagram")
            + "</div>"
        )
        parts.append(_img(run / "top_losses.png", "most confidently wrong images"))
        parts.append("</section>")
    # images from elsewhere
    extra = sorted(p for p in run.glob("eval-*/evaluation.json"))
    if extra or (run / "unseen_predictions.png").is_file():
        parts.append("<h2>Images from elsewhere</h2><section>")
        for path in extra:
            e = read_json(path)
            lo, hi = e["accuracy_ci95"]
            parts.append(
                f"<p><b>{_e(e['data'])}</b>: accuracy {_pct(e['accuracy'])} "
                f"(95% CI {_pct(lo)}–{_pct(hi)}) on {e['n']} images.</p>"
            )
        parts.append(_img(run / "unseen_predictions.png", "predictions on unseen images"))
        parts.append("</section>")
    # configuration
    keys = (
        "backbone",
        "img_size",
        "head",
        "epochs",
        "lr",
        "batch_size",
        "fine_tune_epochs",
        "fine_tune_lr",
        "fine_tune_batch_size",
        "unfreeze",
        "trim",
        "augment",
        "views",
        "fine_tune_head_lr",
        "l2sp",
        "unseen",
        "class_weights",
        "group_by",
        "test_size",
        "val_size",
        "seed",
    )
    rows = "".join(f"<tr><td>{k}</td><td>{_e(config.get(k))}</td></tr>" for k in keys)
    versions = ", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items())
    parts.append(
        f"<h2>Configuration</h2><section><div class='scroll'><table>{rows}</table>"
        f"</div><p class='muted'>{_e(versions)}</p></section>"
    )
    body = "\n".join(p for p in parts if p)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>{body}"
        "</main></body></html>\n"
    )


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run)
    target = Path(out) if out else run / "report.html"
    atomic_write_text(target, build_report(run))
    return target
