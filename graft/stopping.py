"""A stop asked for by a signal (`kill`, `timeout`, Ctrl+C), kept until graft acts on it.

The CLI's handler raises KeyboardInterrupt wherever the main thread is, so that a run
unwinds through its clean-up (graft.train: a run stopped before its first checkpoint
leaves nothing). Python runs the handler between two bytecodes of whatever code is running,
and some libraries swallow what it raises: Cython's memoryview support registers its types
with ``collections.abc`` inside ``try: ... except: pass`` when a module is first imported
(``numpy.random`` is imported lazily at a run's first ``np.random.seed``), so a SIGTERM that
landed there was lost and the run carried on to the end. The handler therefore also records
the request, and graft raises it again at its next progress step or phase
(:func:`raise_if_stopping`).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_requested: int | None = None


def _stop(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = signum
    raise KeyboardInterrupt


def install() -> None:
    """SIGTERM and SIGINT stop the process through KeyboardInterrupt, and the request
    survives code that swallows it. Only in the main thread (where Python runs signal
    handlers); a request left from an earlier call in the same process is forgotten."""
    global _requested
    _requested = None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)


def raise_if_stopping() -> None:
    """Raise KeyboardInterrupt if a signal asked the process to stop: cheap enough for
    every batch."""
    if _requested is not None:
        raise KeyboardInterrupt
