"""The library facade, in the scikit-learn shape.

clf = ImageClassifier(backbone="efficientnet_lite0", epochs=10)   # parameters only
clf.fit("data/pokemon", out="runs/pokemon")                        # returns self
clf.classes_                     # learned attributes end in "_"
clf.predict(paths); clf.predict_proba(paths)
clf.save("runs/copy"); ImageClassifier.load("runs/pokemon")
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainConfig
from .errors import DataError, NotFittedError, RunExistsError


class ImageClassifier:
    """Transfer-learning image classifier. Parameters are those of :class:`TrainConfig`."""

    def __init__(self, **params: Any):
        TrainConfig(**params)  # fail early on bad parameters, with the CLI's messages
        self.params = params

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        folder: str | Path,
        out: str | Path | None = None,
        force: bool = False,
        verbose: bool = False,
    ) -> ImageClassifier:
        """Train on ``folder`` (one sub-folder per class). The run folder ``out`` keeps the
        model, split, history and plots; without it a temporary folder is used."""
        from .predict import Predictor
        from .progress import Reporter
        from .train import fit

        run = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="graft-run-"))
        result = fit(
            TrainConfig(**self.params),
            folder,
            run,
            force=force or out is None,
            reporter=Reporter(verbose=verbose),
        )
        self.run_dir_ = result.run_dir
        self.history_ = result.history
        self.summary_ = result.summary
        self._predictor = Predictor.from_run(run)
        self.classes_ = list(self._predictor.classes)
        return self

    # ------------------------------------------------------------------ inference
    def _check(self) -> Any:
        if getattr(self, "_predictor", None) is None:
            raise NotFittedError(
                "This ImageClassifier is not fitted yet. Call fit(folder) or "
                "ImageClassifier.load(run_dir) first."
            )
        return self._predictor

    def predict_proba(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Class probabilities, one row per path, columns in ``classes_`` order."""
        probs, failed = self._check().predict_proba(list(paths))
        if failed:
            lines = "; ".join(f"{paths[i]}: {r}" for i, r in sorted(failed.items()))
            raise DataError(f"Could not read {len(failed)} image(s): {lines}")
        return probs

    def predict(self, paths: Sequence[str | Path]) -> list[str]:
        probs = self.predict_proba(paths)
        return [self.classes_[i] for i in probs.argmax(1)]

    def score(self, folder: str | Path) -> float:
        """Accuracy on a labelled folder laid out like the training data."""
        from .data import scan

        data = scan(folder, classes=self.classes_)
        pred = self.predict_proba(data.paths).argmax(1)
        return float((pred == np.asarray(data.labels)).mean())

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Copy the run folder (model, config, split, history, plots) to ``path``."""
        self._check()
        path = Path(path)
        if path.exists() and any(path.iterdir()) if path.is_dir() else path.exists():
            if not force:
                raise RunExistsError(f"{path} exists; pass force=True to replace it.")
            shutil.rmtree(path)
        shutil.copytree(self.run_dir_, path)
        return path

    @classmethod
    def load(cls, run: str | Path) -> ImageClassifier:
        """A fitted classifier from a run folder written by ``fit``/``graft train``."""
        from .predict import Predictor
        from .rundir import RunDir

        run = Path(run)
        params = {}
        if RunDir(run).config.is_file():
            known = set(TrainConfig.__dataclass_fields__)
            params = {k: v for k, v in RunDir(run).read_config().items() if k in known}
        self = cls(**params)
        self._predictor = Predictor.from_run(run)
        self.classes_ = list(self._predictor.classes)
        self.run_dir_ = run
        return self
