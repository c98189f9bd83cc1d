"""``ImageClassifier`` in scikit-learn's estimator contract (get_params/set_params, clone,
repr, fitted attributes), and its HTML summary and that of an evaluation, as a notebook
shows them (``_repr_html_``), parsed and checked for content and escaping."""

from __future__ import annotations

import base64
import io
import json
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.utils import estimator_checks
from sklearn.utils.validation import check_is_fitted

from graft import ImageClassifier, NotFittedError, TrainConfig, UsageError
from graft.notebook import EvaluationResult, classifier_html, evaluation_html

# scikit-learn's own checks that apply to an estimator of image folders (the others fit
# numeric arrays). Not run: check_do_not_raise_errors_in_init_or_set_params, since graft
# refuses a bad value when it is given, with the CLI's message, rather than later in fit.
SKLEARN_CHECKS = (
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
)


@pytest.fixture(scope="module")
def clf(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageClassifier:
    run = tmp_path_factory.mktemp("sklearn") / "run"
    shutil.copytree(trained_run, run)  # evaluate() writes into the run: never the shared one
    return ImageClassifier.load(run)


@pytest.mark.parametrize("check", SKLEARN_CHECKS)
def test_scikit_learn_estimator_checks(check: str) -> None:
    with warnings.catch_warnings():
        # check_set_params warns for each value refused early (see SKLEARN_CHECKS)
        warnings.simplefilter("ignore", UserWarning)
        getattr(estimator_checks, check)("ImageClassifier", ImageClassifier(epochs=3))


def test_parameters_are_attributes_listed_in_the_signature() -> None:
    import inspect

    fields = list(TrainConfig.__dataclass_fields__)
    signature = inspect.signature(ImageClassifier)
    assert list(signature.parameters) == fields
    assert signature.parameters["epochs"].default == TrainConfig().epochs
    clf = ImageClassifier(epochs=3, img_size=64)
    assert clf.epochs == 3 and clf.img_size == 64 and clf.backbone == TrainConfig().backbone
    params = clf.get_params(deep=True)
    assert list(params) == fields and params == clf.get_params(deep=False)
    assert params["epochs"] == 3


def test_set_params_checks_everything_before_setting_anything() -> None:
    clf = ImageClassifier(epochs=3)
    assert clf.set_params(epochs=5, img_size=96) is clf
    assert (clf.epochs, clf.img_size) == (5, 96)
    with pytest.raises(ValueError, match=r"epochz.*\bbatch_size\b.*\bepochs\b"):
        clf.set_params(epochz=1)  # names the valid parameters
    with pytest.raises(UsageError, match="augment"):
        clf.set_params(epochs=7, augment="sideways")
    assert clf.epochs == 5  # the good value of a refused call is not kept either


def test_repr_shows_the_parameters_that_differ_from_the_defaults() -> None:
    assert repr(ImageClassifier()) == "ImageClassifier()"
    clf = ImageClassifier(backbone="vgg16", epochs=3)
    assert repr(clf) == "ImageClassifier(backbone='vgg16', epochs=3)"
    assert eval(repr(clf)).get_params() == clf.get_params()  # our own repr, read back


def test_clone_of_a_fitted_classifier_is_unfitted_with_the_same_parameters(
    clf: ImageClassifier,
) -> None:
    check_is_fitted(clf)
    copy = clone(clf)
    assert copy is not clf and copy.get_params() == clf.get_params()
    assert copy.img_size == 64  # the run's own parameters, read by load()
    with pytest.raises(NotFittedError):
        copy.classes_  # noqa: B018
    with pytest.raises(Exception, match="not fitted"):
        check_is_fitted(copy)


class Parsed(HTMLParser):
    """The text, images and tags of an HTML fragment."""

    def __init__(self, html: str):
        super().__init__()
        self.text: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.tags: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def png_of(img: dict[str, str | None]) -> Image.Image:
    src = img["src"] or ""
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_a_fitted_classifier_shows_its_classes_accuracy_run_and_plots(
    clf: ImageClassifier,
) -> None:
    summary = json.loads((Path(clf.run_dir_) / "summary.json").read_text())
    page = Parsed(clf._repr_html_())
    text = page.all_text
    test = summary["test"]
    lo, hi = test["accuracy_ci95"]
    assert "circle, square, triangle (3)" in text
    assert f"accuracy {test['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}) on {test['n']}" in text
    assert str(clf.run_dir_) in text and "efficientnet_lite0, fitted" in text
    assert "img_size=64" in text  # a parameter that is not the default
    assert [i["alt"] for i in page.images] == [
        "learning curves",
        "confusion matrix (held-out test split)",
    ]
    for img in page.images:
        assert png_of(img).width <= 680  # scaled down: the notebook stores every output
    assert "script" not in page.tags


def test_an_unfitted_classifier_says_to_fit() -> None:
    text = Parsed(ImageClassifier(epochs=3)._repr_html_()).all_text
    assert "not fitted: call fit(folder)" in text and "epochs=3" in text


def test_evaluate_returns_the_evaluation_as_a_dict_shown_as_a_table(
    clf: ImageClassifier,
) -> None:
    result = clf.evaluate()
    assert isinstance(result, EvaluationResult) and isinstance(result, dict)
    saved = json.loads((Path(clf.run_dir_) / "evaluation.json").read_text())
    assert result["accuracy"] == saved["accuracy"] and result["n"] == saved["n"]
    page = Parsed(result._repr_html_())
    text = page.all_text
    lo, hi = result["accuracy_ci95"]
    assert "Evaluation on the held-out test split" in text
    assert f"{result['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}) on {result['n']} images" in text
    for name, m in result["per_class"].items():
        assert f"{name} {m['precision']:.3f} {m['recall']:.3f}" in text
    assert [i["alt"] for i in page.images] == ["confusion matrix"]
    png_of(page.images[0]).load()


HOSTILE = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


def test_names_and_paths_are_escaped(tmp_path: Path) -> None:
    run = tmp_path / HOSTILE.replace("/", "|")  # a folder name cannot hold "/"
    run.mkdir()
    (run / "summary.json").write_text(
        json.dumps({"test": {"accuracy": 0.5, "n": 2}, "diagnosis": {"verdict": HOSTILE}})
    )
    shown = classifier_html("ImageClassifier", {"backbone": HOSTILE}, run, [HOSTILE, "b"])
    result = {
        "data": HOSTILE,
        "accuracy": 0.5,
        "n": 2,
        "per_class": {HOSTILE: {"support": 1, "precision": 1.0, "recall": 0.5, "f1": 0.6}},
        "most_confused": [{"true": HOSTILE, "predicted": "b", "count": 1}],
        "output_dir": str(run),
    }
    for html in (shown, evaluation_html(result)):
        page = Parsed(html)
        assert "script" not in page.tags and page.images == []  # shown, never run
        assert HOSTILE in page.all_text  # and shown as it is
        assert "<script>" not in html


@pytest.mark.parametrize("summary", ["{not json", '{"test": [1], "split": 3, "diagnosis": "x"}'])
def test_a_damaged_run_folder_still_shows(tmp_path: Path, summary: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(summary)
    (run / "learning_curves.png").write_bytes(b"not a png")
    text = Parsed(classifier_html("ImageClassifier", {}, run, ["a", "b"])).all_text
    assert "a, b (2)" in text and str(run) in text and "held-out" not in text


def test_a_classifier_with_adamw_gets_adamws_weight_decay_unless_given() -> None:
    from graft import ImageClassifier, TrainConfig

    clf = ImageClassifier(optimizer="adamw")
    assert clf.weight_decay is None and "weight_decay" not in repr(clf)
    assert TrainConfig(**clf.get_params()).weight_decay == 0.01
    given = ImageClassifier(optimizer="adamw", weight_decay=0.0)
    assert TrainConfig(**given.get_params()).weight_decay == 0.0
