"""graft: transfer learning for image classifiers, from a folder of labelled images.

>>> from graft import ImageClassifier
>>> clf = ImageClassifier(epochs=5, fine_tune_epochs=5).fit("pokemon/", out="runs/poke")
>>> clf.predict(["mewtwo.png"])
['mewtwo']
"""

from ._malloc import tune_malloc

# Before torch allocates anything: keep glibc from mmap/munmapping every large tensor.
tune_malloc()

__version__ = "0.1.0"

from .api import ImageClassifier  # noqa: E402
from .backbones import BACKBONES, BackboneSpec, get_spec  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .data import scan  # noqa: E402
from .errors import (  # noqa: E402
    DataError,
    GraftError,
    NotFittedError,
    RunExistsError,
    RunFolderError,
    SplitError,
    UsageError,
    WeightsError,
)
from .evaluate import evaluate_run  # noqa: E402
from .predict import Prediction, Predictor  # noqa: E402
from .train import fit  # noqa: E402

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
