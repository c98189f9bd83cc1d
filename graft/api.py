"""The library facade, in the scikit-learn shape.

clf = ImageClassifier(backbone="efficientnet_lite0", epochs=10)   # parameters only
clf.fit("data/pokemon", out="runs/pokemon")                        # returns self
clf.classes_                     # learned attributes end in "_"
clf.predict(paths); clf.predict_proba(paths)    # a list of paths -> one answer per path
clf.predict("cat.jpg")                          # a single path -> a single answer
clf.save("runs/copy"); ImageClassifier.load("runs/pokemon")

Every mistake a caller can make raises a :class:`graft.errors.GraftError` that says what to
do: NotFittedError before ``fit``/``load``, UsageError for arguments of the wrong kind,
DataError for images that cannot be read, RunExistsError rather than overwrite a folder,
SystemResourceError when the system refuses a write (read-only, full disk).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, overload

import numpy as np

from .config import TrainConfig
from .errors import (
    DataError,
    GraftError,
    NotFittedError,
    RunExistsError,
    SystemResourceError,
    UsageError,
    os_error_message,
)
from .notebook import EvaluationResult

PathLike = str | os.PathLike[str]


def _as_path(value: object, what: str) -> Path:
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str) and text.strip():  # Path("") would be the current folder
            return Path(text)
    raise UsageError(f"{what} must be a file or folder path (str or Path), not {value!r}.")


def _as_paths(paths: object) -> tuple[list[Path], bool]:
    """``(paths as a list, whether a single path was given)``. A string is one path, never
    a sequence of one-letter file names."""
    if isinstance(paths, str | os.PathLike):
        return [_as_path(paths, "paths")], True
    if isinstance(paths, bytes | dict) or not isinstance(paths, Iterable):
        raise UsageError(
            f"paths must be a path (str or Path) or a list of paths, not {type(paths).__name__}."
        )
    return [_as_path(p, "Each of paths") for p in paths], False


def _os_error(exc: OSError, action: str) -> GraftError:
    message = os_error_message(exc, action)
    if message:
        return SystemResourceError(message)
    where = f" ({exc.filename})" if exc.filename else ""
    return UsageError(f"Could not {action}{where}: {exc.strerror or exc}. Choose another path.")


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a run folder's entries into ``target`` (which exists). Unlike
    ``shutil.copytree`` the first OSError escapes as it is, errno and file name intact, so
    a full disk or a read-only folder gets its own message."""
    for root, _dirs, files in os.walk(source):
        into = target / Path(root).relative_to(source)
        into.mkdir(exist_ok=True)
        for name in files:
            shutil.copy2(Path(root) / name, into / name)


def _param_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _declared_defaults() -> dict[str, Any]:
    """TrainConfig's defaults as declared (a None stays None: weight decay is chosen by the
    optimizer when the config is made, so a classifier with ``optimizer="adamw"`` gets
    adamw's own)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _check_names(params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(_param_names()))
    if unknown:
        raise UsageError(
            f"Unknown parameter(s) {', '.join(unknown)}: ImageClassifier takes those of "
            f"TrainConfig ({', '.join(sorted(_param_names()))})."
        )


class ImageClassifier:
    """Transfer-learning image classifier. Parameters are those of :class:`TrainConfig`,
    each an attribute (``clf.epochs``), as in scikit-learn: ``get_params``/``set_params``,
    ``sklearn.base.clone`` and a repr of the parameters that differ from the defaults.
    Unlike scikit-learn, a bad value fails here rather than in ``fit``, with the CLI's
    message. In a notebook a classifier, and an evaluation, show as a compact table."""

    def __init__(self, **params: Any):
        _check_names(params)
        TrainConfig(**params)  # fail early on bad parameters, with the CLI's messages
        defaults = _declared_defaults()
        for name in _param_names():  # the objects given, as sklearn's clone checks
            setattr(self, name, params[name] if name in params else defaults[name])

    def __getattr__(self, name: str) -> Any:
        # Learned attributes (classes_, run_dir_, ...) exist only after fit/load: say so.
        if name.endswith("_") and not name.startswith("__"):
            raise NotFittedError(
                f"This ImageClassifier has no {name} yet: call fit(folder) or "
                "ImageClassifier.load(run_dir) first."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Every parameter by name (``deep`` is scikit-learn's: there are no nested
        estimators, so it changes nothing)."""
        return {name: getattr(self, name) for name in _param_names()}

    def set_params(self, **params: Any) -> ImageClassifier:
        """Change parameters (all checked before any is set); returns self. A fitted
        classifier keeps its model until the next ``fit``."""
        _check_names(params)
        TrainConfig(**{**self.get_params(), **params})
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def _changed_params(self) -> dict[str, Any]:
        defaults = _declared_defaults()
        return {k: v for k, v in self.get_params().items() if v != defaults[k]}

    def __repr__(self) -> str:
        from .notebook import params_text

        return f"{type(self).__name__}({params_text(self._changed_params())})"

    def __sklearn_is_fitted__(self) -> bool:
        return self.__dict__.get("_predictor") is not None

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags (its checks and ``check_is_fitted`` ask, from 1.6): a
        classifier to fit first, labels from the folders (fit takes no y), image paths in."""
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=False),
            classifier_tags=ClassifierTags(),
            input_tags=InputTags(one_d_array=True, two_d_array=False, string=True),
        )

    def _repr_html_(self) -> str:
        from .notebook import classifier_html

        fitted = self.__sklearn_is_fitted__()
        return classifier_html(
            type(self).__name__,
            self._changed_params(),
            Path(self.run_dir_) if fitted else None,
            list(self.classes_) if fitted else [],
        )

    # ------------------------------------------------------------------ training
    def fit(
        self,
        folder: PathLike | None = None,
        out: PathLike | None = None,
        force: bool = False,
        verbose: bool = False,
        *,
        labels_csv: PathLike | None = None,
    ) -> ImageClassifier:
        """Train on ``folder`` (one sub-folder per class, or already split: train/, val/ and
        test/ folders of class folders, used as given), or on the images ``labels_csv``
        lists (columns path,label and optionally split; graft.layouts). The run folder
        ``out`` keeps the model, split, history and plots; without it a temporary folder is
        used."""
        from .predict import Predictor
        from .progress import Reporter
        from .train import fit

        params = self.get_params()
        if labels_csv is not None:
            params["labels_csv"] = str(_as_path(labels_csv, "labels_csv"))
        if folder is not None and params.get("labels_csv"):
            raise UsageError("Give fit either a folder or labels_csv, not both.")
        if folder is None and not params.get("labels_csv"):
            raise UsageError("fit needs the data: a folder, or labels_csv=FILE.")
        folder = _as_path(folder, "folder") if folder is not None else None
        run = _as_path(out, "out") if out is not None else None
        if run is None:
            try:
                run = Path(tempfile.mkdtemp(prefix="graft-run-"))
            except OSError as exc:
                raise _os_error(exc, "create a temporary run folder") from exc
        result = fit(
            TrainConfig(**params),
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
        if self.__dict__.get("_predictor") is None:
            raise NotFittedError(
                "This ImageClassifier is not fitted yet. Call fit(folder) or "
                "ImageClassifier.load(run_dir) first."
            )
        return self._predictor

    def _scores(self, paths: list[Path]) -> tuple[np.ndarray, np.ndarray | None]:
        predictor = self._check()
        if not paths:
            empty = np.zeros(0, dtype=np.float32) if predictor.has_familiarity else None
            return np.zeros((0, len(self.classes_)), dtype=np.float32), empty
        probs, familiarity, failed = predictor.predict_scores(paths)
        if failed:
            lines = "; ".join(f"{paths[i]}: {r}" for i, r in sorted(failed.items()))
            raise DataError(
                f"Could not predict {len(failed)} of {len(paths)} image(s): {lines}. "
                "Remove or replace them (graft predict reports the rest)."
            )
        return probs, familiarity

    def _proba(self, paths: list[Path]) -> np.ndarray:
        return self._scores(paths)[0]

    @overload
    def predict_proba(self, paths: PathLike) -> np.ndarray: ...
    @overload
    def predict_proba(self, paths: Iterable[PathLike]) -> np.ndarray: ...
    def predict_proba(self, paths: PathLike | Iterable[PathLike]) -> np.ndarray:
        """Class probabilities, columns in ``classes_`` order: for a single path one row
        ``[n_classes]``; for a list of paths ``[len(paths), n_classes]`` (``[0, n_classes]``
        for an empty list). Raises DataError naming every image that cannot be read."""
        items, single = _as_paths(paths)
        probs = self._proba(items)
        return probs[0] if single else probs

    @overload
    def predict(self, paths: PathLike, unknown: bool = True) -> str: ...
    @overload
    def predict(self, paths: Iterable[PathLike], unknown: bool = True) -> list[str]: ...
    def predict(
        self, paths: PathLike | Iterable[PathLike], unknown: bool = True
    ) -> str | list[str]:
        """The answer per image, as ``graft predict`` gives it: the most probable class, or
        ``"unknown"`` for an image the model is unsure of or that looks unlike every
        training image (graft.runtime.is_unknown; ``unknown=False`` always names a class).
        A single path gives one answer, a list of paths a list (empty for an empty list)."""
        from .runtime import is_unknown

        if not isinstance(unknown, bool):  # "off" would be true
            raise UsageError(f"unknown must be True or False, not {unknown!r}.")
        items, single = _as_paths(paths)
        probs, familiarity = self._scores(items)
        info = self._check().info
        labels = []
        for i, row in enumerate(probs):
            fam = None if familiarity is None else float(familiarity[i])
            flagged = unknown and is_unknown(
                float(row.max()), info.unknown_threshold, fam, info.familiarity_threshold
            )
            labels.append("unknown" if flagged else self.classes_[int(row.argmax())])
        return labels[0] if single else labels

    @overload
    def familiarity(self, paths: PathLike) -> float: ...
    @overload
    def familiarity(self, paths: Iterable[PathLike]) -> np.ndarray: ...
    def familiarity(self, paths: PathLike | Iterable[PathLike]) -> float | np.ndarray:
        """How much each image looks like the training images (graft.familiarity: cosine
        similarity to the k-th nearest training image, in [-1, 1]; below
        ``familiarity_threshold_`` the answer is "unknown"). UsageError for a model trained
        without the score (``unknown_keep=0`` or an older graft)."""
        items, single = _as_paths(paths)
        if not self._check().has_familiarity:
            raise UsageError(
                "This model has no familiarity score: it was trained with unknown_keep=0 or "
                "by an older graft. Train it again to get one."
            )
        _, familiarity = self._scores(items)
        assert familiarity is not None
        return float(familiarity[0]) if single else familiarity

    @property
    def familiarity_threshold_(self) -> float | None:
        """Below this familiarity ``predict`` answers "unknown" (None: no score)."""
        predictor = self._check()
        return predictor.info.familiarity_threshold if predictor.has_familiarity else None

    def score(self, folder: PathLike) -> float:
        """Accuracy of the top class on a labelled folder laid out like the training data
        (as ``predict(paths, unknown=False)``: "unknown" answers are not counted apart)."""
        from .data import scan

        self._check()
        data = scan(_as_path(folder, "folder"), classes=self.classes_)
        pred = self._proba([Path(p) for p in data.paths]).argmax(1)
        return float((pred == np.asarray(data.labels)).mean())

    def evaluate(
        self,
        folder: PathLike | None = None,
        *,
        tta: bool = False,
        others: PathLike | None = None,
        verbose: bool = False,
    ) -> EvaluationResult:
        """``graft evaluate``: the held-out test split (``folder`` None; written to the
        run folder) or a labelled ``folder`` (written to ``RUN/eval-NAME``). A dict of
        ``evaluation.json``'s content, shown as a table when it ends a notebook cell."""
        from .evaluate import evaluate_run
        from .progress import Reporter

        self._check()
        result = evaluate_run(
            self.run_dir_,
            _as_path(folder, "folder") if folder is not None else None,
            reporter=Reporter(verbose=verbose),
            tta=tta,
            others=_as_path(others, "others") if others is not None else None,
        )
        return EvaluationResult(result)

    # ------------------------------------------------------------------ persistence
    def save(self, path: PathLike, force: bool = False) -> Path:
        """Copy the run folder (model, config, split, history, plots) to ``path``.

        An existing file, or a non-empty folder, is refused (RunExistsError) unless
        ``force`` is true and it holds a graft run: then only graft's files there are
        replaced, and files you added are kept. A folder that is not a graft run is never
        touched. Raises UsageError for the run's own folder (or a folder inside it) and
        SystemResourceError when the system refuses the write."""
        from .rundir import RunDir

        self._check()
        path = _as_path(path, "path")
        source = Path(self.run_dir_).resolve()
        target = path.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise UsageError(
                f"Cannot save to {path}: it is this classifier's own run folder ({source}), "
                "inside it or around it. Choose a separate folder."
            )
        if path.exists() and not path.is_dir():
            raise RunExistsError(f"{path} exists and is a file. Choose another path.")
        if path.is_dir() and any(path.iterdir()):
            if not force:
                raise RunExistsError(
                    f"{path} exists and is not empty. Choose another path, or pass force=True "
                    "to replace the graft run in it."
                )
            if RunDir(path).owned() is None:
                raise RunExistsError(
                    f"{path} is not a graft run folder, so save() will not touch it even with "
                    "force=True. Choose another path."
                )
        created = not path.exists()
        try:
            before = RunDir(path).prepare(force)  # removes only graft's own files there
        except OSError as exc:
            raise _os_error(exc, f"save the run to {path}") from exc
        try:
            _copy_tree(source, path)
        except OSError as exc:
            RunDir(path).discard_new(before, created)  # no half-copied run left behind
            RunDir(path).restore_replaced()  # and the one it was replacing put back
            raise _os_error(exc, f"save the run to {path}") from exc
        RunDir(path).drop_replaced()
        return path

    @classmethod
    def load(cls, run: PathLike) -> ImageClassifier:
        """A fitted classifier from a run folder written by ``fit``/``graft train``."""
        from .predict import Predictor
        from .rundir import RunDir

        run = _as_path(run, "run")
        params = {}
        if RunDir(run).config.is_file():
            known = set(TrainConfig.__dataclass_fields__)
            params = {k: v for k, v in RunDir(run).read_config().items() if k in known}
        self = cls(**params)
        self._predictor = Predictor.from_run(run)
        self.classes_ = list(self._predictor.classes)
        self.run_dir_ = run
        return self


# The parameters in the signature, as scikit-learn reads them (its clone and checks, and
# the help a notebook shows): TrainConfig's fields, keyword-only, with their defaults.
ImageClassifier.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in dataclasses.fields(TrainConfig)
    ]
)
