"""Exceptions raised by graft.

Every error a user can cause says what went wrong, where, and what to do about it.
The CLI turns them into one readable message and an exit code; no traceback.

    GraftError                  base class; ``exit_code`` is what the CLI returns
    ├── UsageError              bad option values or combinations        (exit 2)
    ├── DataError               the images or folders cannot be used     (exit 3)
    │   └── SplitError          too few images to split as asked
    ├── WeightsError            pretrained or saved weights missing/bad   (exit 4)
    ├── RunExistsError          refusing to overwrite a run folder        (exit 5)
    ├── RunFolderError          a run folder is missing, incomplete or     (exit 6)
    │                           tampered with
    ├── SystemResourceError     the machine refused: disk full, read-only  (exit 8)
    │                           or forbidden folder, port in use
    └── DivergedError           the training loss became NaN or infinite  (exit 9)

Exit 7 (``PARTIAL_FAILURE_EXIT``) is not an exception: the command finished but skipped
some inputs. Exit 1 is kept for real bugs: anything else that escapes.
"""

from __future__ import annotations


class GraftError(Exception):
    """Base class of all errors graft raises on purpose."""

    exit_code = 1


class UsageError(GraftError, ValueError):
    """An option has a value graft cannot use."""

    exit_code = 2


class DataError(GraftError):
    """The dataset folder or an image in it cannot be used."""

    exit_code = 3


class SplitError(DataError):
    """A class has too few images for the requested stratified split."""


class WeightsError(GraftError):
    """Pretrained weights are unavailable, or a weights file is unreadable."""

    exit_code = 4


class RunExistsError(GraftError):
    """The output run folder exists and ``--force`` was not given."""

    exit_code = 5


class RunFolderError(GraftError):
    """A run folder is missing files that graft needs to load the model."""

    exit_code = 6


class SystemResourceError(GraftError):
    """The operating system refused: no space left, a read-only or forbidden folder, a port
    that is taken. Not graft's bug and not the data's fault: the message names the path."""

    exit_code = 8


class DivergedError(GraftError):
    """The training loss became NaN or infinite; the run stops rather than save a broken
    model (the last good checkpoint is kept)."""

    exit_code = 9


def os_error_message(exc: OSError, action: str = "") -> str | None:
    """A plain sentence for an OSError the user's machine caused (full disk, read-only or
    forbidden path, port in use), or None when it looks like something else."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    what = f"Could not {action}{where}" if action else f"The system refused{where}"
    advice = {
        errno.ENOSPC: "the disk is full: free some space or write somewhere else",
        errno.EDQUOT: "the disk quota is used up: free some space or write somewhere else",
        errno.EROFS: "the file system is read-only: choose a writable folder",
        errno.EACCES: "permission denied: choose a folder you can write to, or fix its rights",
        errno.EPERM: "operation not permitted: choose a folder you can write to",
        errno.EADDRINUSE: "the address is in use: choose another --port or stop the other server",
        errno.EADDRNOTAVAIL: "the address is not on this machine: check --host",
        errno.ENAMETOOLONG: "the file name is too long for this file system",
        errno.EMFILE: "too many open files: raise `ulimit -n`",
        errno.ENOENT: "no such file or folder: check the path",
    }.get(exc.errno or -1)
    return f"{what}: {advice}." if advice else None


class NotFittedError(GraftError, AttributeError):
    """The classifier was used before ``fit`` or ``load``."""


# Exit code for commands that finished but had to skip some inputs
# (for example ``graft predict`` when some files could not be read).
PARTIAL_FAILURE_EXIT = 7
