"""A stop asked for by a signal (`kill`, `timeout`, Ctrl+C), kept until graft acts on it.

The CLI's handler raises KeyboardInterrupt wherever the main thread is, so that a run
unwinds through its clean-up (graft.train: a run stopped before its first checkpoint
leaves nothing). Python runs the handler between two bytecodes of whatever code is running,
and some libraries swallow what it raises: Cython's memoryview support registers its types
with ``collections.abc`` inside ``try: ... except: pass`` when a module is first imported
(``numpy.random`` is imported lazily at a run's first ``np.random.seed``), so a SIGTERM that
landed there was lost and the run carried on to the end. The handler therefore also records
the request, and graft raises it again at its next progress step or phase
(:func:`raise_if_stopping`). Only the first signal raises: a second one (Ctrl+C pressed
twice, `timeout` and then `kill`) would land in the clean-up the first one started and
leave a half-removed run folder, so it is ignored; and once the command has its result the
handlers are put back (:func:`uninstall`), so that a signal during the interpreter's exit
does not raise in its atexit hooks.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

_requested: int | None = None
_previous: dict[int, Any] = {}


def _stop(signum: int, frame: FrameType | None) -> None:
    global _requested
    if _requested is not None:  # the clean-up of the first one is under way
        return
    _requested = signum
    raise KeyboardInterrupt


def install() -> None:
    """SIGTERM and SIGINT stop the process through KeyboardInterrupt, and the request
    survives code that swallows it. Only in the main thread (where Python runs signal
    handlers); a request left from an earlier call in the same process is forgotten."""
    global _requested
    _requested = None
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            _previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, _stop)


def uninstall() -> None:
    """Put back the handlers :func:`install` replaced (one installed from C, which Python
    cannot put back, stays replaced), and forget the request: it has been acted on, and
    later library calls in this process (a notebook, a test) must not stop because of it."""
    global _requested
    _requested = None
    if threading.current_thread() is threading.main_thread():
        while _previous:
            signum, handler = _previous.popitem()
            if handler is not None:
                signal.signal(signum, handler)


def stop_requested() -> int | None:
    """The signal that asked the process to stop, if one did (an error that follows may be
    its consequence: an import it interrupted, say)."""
    return _requested


def raise_if_stopping() -> None:
    """Raise KeyboardInterrupt if a signal asked the process to stop: cheap enough for
    every batch."""
    if _requested is not None:
        raise KeyboardInterrupt
