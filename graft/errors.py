"""Exceptions raised by graft.

Every error a user can cause says what went wrong, where, and what to do about it.
The CLI turns them into one readable message and an exit code; no traceback.

    GraftError                  base class; ``exit_code`` is what the CLI returns
    ├── UsageError              bad option values or combinations        (exit 2)
    ├── DataError               the images or folders cannot be used     (exit 3)
    │   └── SplitError          too few images to split as asked
    ├── WeightsError            pretrained or saved weights missing/bad   (exit 4)
    ├── RunExistsError          refusing to overwrite a run folder        (exit 5)
    └── RunFolderError          a run folder is missing or incomplete     (exit 6)
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


class NotFittedError(GraftError, AttributeError):
    """The classifier was used before ``fit`` or ``load``."""


# Exit code for commands that finished but had to skip some inputs
# (for example ``graft predict`` when some files could not be read).
PARTIAL_FAILURE_EXIT = 7
