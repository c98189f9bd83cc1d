"""What ``graft scan``, ``graft evaluate`` and ``graft predict`` print for a person: rich tables.

Only the CLI imports this module, inside its commands, so ``graft --help`` never loads rich.
Every file name and message passes through :func:`display` first: names that are not UTF-8
print with U+FFFD, and brackets in them are not taken for rich markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console as _RichConsole
from rich.markup import escape
from rich.table import Table

from .io import display as _display


class Console(_RichConsole):
    """rich's Console, except where stdout's reader went away (`graft evaluate RUN |
    head -1`): rich would exit 1, which graft's exit codes keep for its own bugs; the
    BrokenPipeError goes to graft.cli.main instead, which exits as SIGPIPE would (141)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def display(text: object) -> str:
    """Printable in the terminal: non-UTF-8 bytes replaced, rich markup characters escaped."""
    return escape(_display(text))


def print_scan(data: Any, findings: list[str], audit_summary: dict | None, plot: Path) -> None:
    """Counts per class, files left out, warnings and audit findings of ``graft scan``."""
    console = Console()
    table = Table(title=display(data.root))
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    total = len(data.paths)
    for name, n in data.counts.items():
        table.add_row(display(name), str(n), f"{n / total:.1%}")
    table.add_row("[bold]total", f"[bold]{total}", "")
    console.print(table)
    if data.skipped:
        console.print(
            f"[yellow]{len(data.skipped)} file(s) or row(s) could not be used and are left out:"
        )
        for p, reason in data.skipped:
            console.print(f"  {display(p)}: {display(reason)}")
    if data.unsupported:
        console.print(f"{len(data.unsupported)} file(s) with unsupported extensions ignored.")
    for w in data.warnings:
        console.print(f"[yellow]warning:[/] {display(w)}")
    for f in findings:
        console.print(f"[yellow]audit:[/] {display(f)}")
    if audit_summary is not None and not findings:
        console.print("audit: no duplicates or near-duplicates found.")
    console.print(f"Bar chart: {display(plot)}")


def print_evaluation(result: dict) -> None:
    """The metrics table of ``graft evaluate`` and the notes under it."""
    console = Console()
    lo, hi = result["accuracy_ci95"]
    table = Table(
        title=f"{display(result['data'])}: accuracy {result['accuracy']:.1%} "
        f"(95% CI {lo:.1%}-{hi:.1%}) on {result['n']} images, loss {result['loss']:.3f}, "
        f"calibration error {result['calibration']['ece']:.3f}",
        title_justify="left",
    )
    for col in ("class", "precision", "recall", "recall 95% CI", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in result["per_class"].items():
        if not m["support"]:  # no image of this class: its recall is undefined, not 0
            table.add_row(display(name), "-", "-", "-", "-", "0 (none here)")
            continue
        table.add_row(
            display(name),
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['recall_ci95'][0]:.2f}-{m['recall_ci95'][1]:.2f}",
            f"{m['f1']:.3f}",
            str(m["support"]),
        )
    console.print(table)
    if "tta_effect" in result:
        t = result["tta_effect"]
        console.print(
            f"TTA: accuracy {t['accuracy_without']:.1%} -> {t['accuracy_with']:.1%}, "
            f"loss {t['loss_without']:.3f} -> {t['loss_with']:.3f}"
        )
    o = result["open_set"]
    if o["threshold"] > 0 or "familiarity_threshold" in o:
        rule = []
        if o["threshold"] > 0:
            rule.append(f"below {o['threshold']:.1%} confidence")
        if "familiarity_threshold" in o:
            rule.append(f"less familiar than {o['familiarity_threshold']:.3f}")
        console.print(
            f"Open set: {' or '.join(rule)} the answer is 'unknown': "
            f"{o['coverage']:.1%} answered, {o['answered_accuracy']:.1%} of those right."
        )
    for c in result["most_confused"]:
        console.print(
            f"confused: {display(c['true'])} taken for {display(c['predicted'])} ({c['count']}x)"
        )
    for f in result["failed"]:
        console.print(f"[yellow]skipped[/] {display(f['path'])}: {display(f['reason'])}")
    if "others" in result:
        _print_others(console, result["others"], result.get("output_dir"))
    console.print(f"Confusion matrix: {Path(result['output_dir']) / 'confusion_matrix.png'}")


def _print_others(console: Console, o: dict, out: str | None) -> None:
    """What ``--others`` measured: one summary line, the files skipped, the histogram."""
    auroc = "-" if o["auroc"] is None else f"{o['auroc']:.3f}"
    fpr = "-" if o["fpr_at_95_tpr"] is None else f"{o['fpr_at_95_tpr']:.1%}"
    console.print(
        f"Others ({o['n_others']} images of none of the classes, {display(o['folder'])}): "
        f"{o['others_rejected']:.1%} answered 'unknown'; {o['in_class_answered']:.1%} of the "
        f"{o['n_in_class']} in-class images answered, {o['in_class_answered_accuracy']:.1%} "
        f"of those right. Score {o['score']}: AUROC {auroc}, false positives at 95% true "
        f"positives {fpr}."
    )
    if o["score"] != "familiarity":
        console.print(f"[yellow]note:[/] the score is {display(o['score_meaning'])}.")
    if o["auroc"] is not None and o["auroc"] < 0.5:
        console.print(
            "[yellow]warning:[/] the others score as MORE like the training images than the "
            "in-class images (AUROC below 0.5): are they images of the model's classes?"
        )
    for f in o["failed"]:
        console.print(f"[yellow]skipped[/] {display(f['path'])}: {display(f['reason'])}")
    if out:
        console.print(f"Histogram: {display(Path(out) / 'familiarity.png')}")


def print_predictions(preds: Sequence[Any]) -> None:
    """One row per image of ``graft predict``: the answer and the next classes."""
    table = Table()
    table.add_column("image", overflow="fold", ratio=3)
    table.add_column("prediction", no_wrap=True)
    table.add_column("next classes", ratio=2)
    # how like the training images each one is (graft.familiarity), when the model says
    familiar = any(getattr(p, "familiarity", None) is not None for p in preds)
    if familiar:
        table.add_column("familiarity", justify="right", no_wrap=True)
    for p in preds:
        if p.error:
            table.add_row(display(p.path), "[red]error", display(p.error), *[""] * familiar)
            continue
        best, prob = p.top[0]
        best = display(best)
        answer = f"unknown (best {best} {prob:.1%})" if p.unknown else f"{best} {prob:.1%}"
        rest = ", ".join(f"{display(c)} {q:.1%}" for c, q in p.top[1:])
        extra = [f"{p.familiarity:.2f}" if p.familiarity is not None else ""] * familiar
        table.add_row(display(p.path), answer, rest, *extra)
    Console().print(table)
