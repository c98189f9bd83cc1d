"""What a run tells the person watching it: progress bars, epochs, warnings (via rich).

The library is silent unless given a ``Reporter(verbose=True)``; the CLI always gives one.
Everything goes to stderr so that ``--json``/``--csv`` output on stdout stays clean. In a
Jupyter notebook rich prints HTML outputs, and the bars are HTML too (graft.notebook).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .stopping import raise_if_stopping

T = TypeVar("T")


class Reporter:
    def __init__(self, verbose: bool = False, console: Console | None = None):
        self.verbose = verbose
        self.console = console or Console(stderr=True, highlight=False)

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )

    @contextlib.contextmanager
    def bar(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """``with reporter.bar("Training", n) as advance: ... advance(k)``. Each step is
        also where a stop asked for by a signal is acted on (graft.stopping)."""
        with self._bar(label, total) as advance:

            def step(n: int) -> None:
                advance(n)
                raise_if_stopping()

            yield step

    @contextlib.contextmanager
    def _bar(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.verbose and self.console.is_jupyter:
            # rich's live bars need ipywidgets in a notebook: an HTML output instead
            from .notebook import notebook_bar

            with notebook_bar(label, total) as advance:
                yield advance
            return
        if not self.verbose or not self.console.is_terminal:
            # Progress bars only on a terminal; logs and pipes get the epoch lines alone.
            yield lambda n: None
            return
        with self._progress() as progress:
            task = progress.add_task(label, total=total)
            yield lambda n: progress.advance(task, n)

    def iter(self, items: Iterable[T], total: int, label: str) -> Iterator[T]:
        with self.bar(label, total) as advance:
            for item in items:
                yield item
                advance(1)

    # Messages carry class names and paths, which may contain "[...]": never rich markup.
    def info(self, text: str) -> None:
        if self.verbose:
            self.console.print(escape(text))

    def warn(self, text: str) -> None:
        if self.verbose:
            self.console.print(f"[yellow]warning:[/] {escape(text)}")

    def stage(self, text: str) -> None:
        if self.verbose:
            self.console.rule(f"[bold]{text}")

    def epoch(self, rec: Any, improved: bool) -> None:
        if self.verbose:
            mark = " [green]* best so far[/]" if improved else ""
            unseen = getattr(rec, "unseen_acc", float("nan"))
            elsewhere = f"  elsewhere {unseen:6.1%}" if unseen == unseen else ""
            self.console.print(
                f"{rec.stage:>9} {rec.epoch:>2}  train {rec.train_loss:.4f} {rec.train_acc:6.1%}"
                f"  val {rec.val_loss:.4f} {rec.val_acc:6.1%}{elsewhere}  {rec.seconds:5.1f}s"
                f"{mark}",
                soft_wrap=True,
            )

    def diagnosis(self, d: Any) -> None:
        if self.verbose:
            self.console.print(f"[bold]Diagnosis: {d.verdict}[/] - {escape(d.explanation)}")
            for note in d.notes:
                self.console.print(f"  - {escape(note)}")
