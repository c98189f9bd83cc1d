"""graft: transfer learning for image classifiers, from a folder of labelled images.

>>> from graft import ImageClassifier
>>> clf = ImageClassifier(epochs=5, fine_tune_epochs=5).fit("pokemon/", out="runs/poke")
>>> clf.predict(["mewtwo.png"])
['mewtwo']

``import graft`` has no side effects and stays light: the public names below are imported
from their modules on first use (PEP 562), so ``graft --help`` never loads torch. The glibc
malloc tuning (graft._malloc) is applied where work starts: the CLI, :func:`fit` and
:class:`Predictor`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ImageClassifier": "api",
    "BACKBONES": "backbones",
    "BackboneSpec": "backbones",
    "get_spec": "backbones",
    "TrainConfig": "config",
    "scan": "data",
    "DataError": "errors",
    "GraftError": "errors",
    "NotFittedError": "errors",
    "RunExistsError": "errors",
    "RunFolderError": "errors",
    "SplitError": "errors",
    "UsageError": "errors",
    "WeightsError": "errors",
    "evaluate_run": "evaluate",
    "Prediction": "predict",
    "Predictor": "predict",
    "fit": "train",
}

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "DataError",
    "GraftError",
    "ImageClassifier",
    "NotFittedError",
    "Prediction",
    "Predictor",
    "RunExistsError",
    "RunFolderError",
    "SplitError",
    "TrainConfig",
    "UsageError",
    "WeightsError",
    "__version__",
    "evaluate_run",
    "fit",
    "get_spec",
    "scan",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from .api import ImageClassifier
    from .backbones import BACKBONES, BackboneSpec, get_spec
    from .config import TrainConfig
    from .data import scan
    from .errors import (
        DataError,
        GraftError,
        NotFittedError,
        RunExistsError,
        RunFolderError,
        SplitError,
        UsageError,
        WeightsError,
    )
    from .evaluate import evaluate_run
    from .predict import Prediction, Predictor
    from .train import fit
