"""Run an exported graft model with numpy and Pillow only: no graft, no torch (except for
the TorchScript format), no training dependencies.

This file is graft's single source of how an image is decoded and preprocessed, and
``graft export`` copies it verbatim into every export folder as ``graft_runtime.py``. So an
exported model sees exactly the pixels graft trained and evaluated on (checked by
tests/test_export.py). Use it as a library::

    from graft_runtime import ExportedModel
    model = ExportedModel("export-onnx")
    for top in model.predict(["cat.jpg"]):
        print(top)

or as a script: ``python graft_runtime.py [--unknown off] EXPORT_DIR IMAGE...``. Each image
gets one line, its answer (with its familiarity, when the model has the score) or why it
could not be read (missing, a folder, not an image, truncated, over
Pillow's pixel limit ``Image.MAX_IMAGE_PIXELS``); the others are still predicted. Exit codes:
0 all predicted, 2 usage, 6 the export folder is unusable, 7 some images failed.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageOps

#: the JSON file beside every exported model: preprocessing, labels, calibration, metrics
METADATA_FILE = "graft.json"
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
#: the package each format's engine needs, for the message when it is not installed
ENGINE_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torch"}
#: exit codes of ``python graft_runtime.py`` (those of ``graft`` for the same situations)
EXIT_USAGE, EXIT_EXPORT, EXIT_PARTIAL = 2, 6, 7
#: the answer for an image whose scores are NaN or infinite: never reported as numbers
NON_FINITE = (
    "the model produced non-finite scores (NaN or infinity): the run's weights are broken; "
    "retrain it"
)


class ExportError(ValueError):
    """The export folder cannot be used: missing, incomplete or damaged files, or the
    engine its format needs is not installed. Not an image's fault."""


def describe_error(exc: BaseException) -> str:
    """Why one image could not be read, in a few words (for its line or entry)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"refused: image too large ({text})"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied: the file cannot be read"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (or an unsupported format)"
    if "truncated" in text.lower() or "broken" in text.lower():
        return f"truncated or corrupt image ({text})"
    return f"could not be read ({text})"


def load_image(source: str | Path | bytes, size_hint: int | None = None) -> Image.Image:
    """Decode one image as 8-bit RGB, the way graft sees every image.

    - EXIF orientation is applied, so a phone photo is upright;
    - animated images (GIF, WebP) use their first frame;
    - transparency is composited on white (sprites and logos have transparent backgrounds);
    - ``size_hint`` lets JPEG decode at a reduced scale (``draft``) when only a small image is
      needed, which is several times faster for large photos.

    Raises ``OSError``/``ValueError`` (from Pillow) when the data is not a readable image, and
    ``Image.DecompressionBombWarning`` for images over Pillow's pixel limit (a "bomb").
    """
    if not isinstance(source, bytes) and os.path.exists(source):
        # A FIFO or device named like an image would block the read forever: never opened.
        if not stat.S_ISREG(os.stat(source).st_mode) and not os.path.isdir(source):
            raise ValueError("not a regular file (a pipe, socket or device)")
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        # A DecompressionBombWarning becomes an error: such an image is refused, not decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(handle) as im:
            if size_hint and im.format == "JPEG":
                im.draft("RGB", (size_hint, size_hint))
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey and 32-bit float (often 0-1): scale to 8 bits rather than clipping
        # everything to white, or a float image's 0-1 to black.
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = arr.max() if arr.size and arr.max() > 0 else 1.0
        arr = np.clip(arr, 0.0, None)
        im = Image.fromarray((arr / peak * 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def trim_background(im: Image.Image, tolerance: int = 12, margin: float = 0.08) -> Image.Image:
    """Crop a uniform background (the colour of the top-left pixel) down to a square around
    the object, with a ``margin`` on each side, padding with the background colour.

    Sprites, product shots and scans put a small object in a large empty frame; photos and
    drawings from elsewhere fill theirs. Trimming gives the network the object at one scale
    whatever the source. Images whose content already fills the frame are left alone."""
    background = im.getpixel((0, 0))
    diff = ImageChops.difference(im, Image.new("RGB", im.size, background)).convert("L")
    box = diff.point(lambda v: 255 if v > tolerance else 0).getbbox()
    if box is None:
        return im
    left, top, right, bottom = box
    if right - left >= 0.9 * im.width and bottom - top >= 0.9 * im.height:
        return im
    side = max(1, round(max(right - left, bottom - top) * (1 + 2 * margin)))
    x0 = round((left + right - side) / 2)
    y0 = round((top + bottom - side) / 2)
    out = Image.new("RGB", (side, side), background)
    out.paste(im, (-x0, -y0))
    return out


def cap_detail(im: Image.Image, detail: int) -> Image.Image:
    """Downscale ``im`` so that its longest side is at most ``detail`` pixels (bilinear,
    antialiased, aspect kept); ``detail`` 0 or a smaller image: unchanged.

    A model trained on small pictures (sprites, icons, thumbnails: ``detail`` is their
    median size, graft.detail) has never seen more detail than they hold; a large picture
    from elsewhere brought down to the same size looks like them again (measured in
    BENCHMARKS.md, "Detail size")."""
    side = max(im.size)
    if detail <= 0 or side <= detail:
        return im
    ratio = detail / side
    size = (max(1, round(im.width * ratio)), max(1, round(im.height * ratio)))
    return im.resize(size, Image.Resampling.BILINEAR)


# A NamedTuple, not a dataclass: graft_runtime.py must also load when imported from a file
# path without a sys.modules entry, where dataclass fails on string annotations.
class Preprocessing(NamedTuple):
    """How a picture becomes the network's input, everywhere it is made: training,
    prediction, serving and the exported runtime (one description, so that no call site
    can forget a step). ``size``: the square input; ``mean``/``std``: per channel, on
    [0, 1] values; ``trim``: crop a uniform background first (:func:`trim_background`);
    ``detail``: then bring a larger picture down to that many pixels (:func:`cap_detail`,
    0 = never)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    trim: bool = False
    detail: int = 0


def preprocess(images: Sequence[Image.Image], pre: Preprocessing) -> np.ndarray:
    """RGB images -> a float32 NCHW batch as ``pre`` describes: trimmed, detail-capped,
    the whole image resized to ``size`` x ``size`` (bilinear with antialiasing, as
    torchvision's ``Resize`` does on a PIL image), scaled to [0, 1], then normalised per
    channel."""
    m = np.asarray(pre.mean, dtype=np.float32)
    s = np.asarray(pre.std, dtype=np.float32)
    size = pre.size
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, im in enumerate(images):
        if pre.trim:
            im = trim_background(im)
        im = cap_detail(im, pre.detail)
        resized = im.resize((size, size), Image.Resampling.BILINEAR)
        normalise_into(batch[i : i + 1], np.asarray(resized)[None], m, s)
    return batch


def normalise_into(out: np.ndarray, rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """``out[n, c] = (rgb[n, ..., c] / 255 - mean[c]) / std[c]``, in place: planar, so each
    step runs over whole channels (broadcasting over a last axis of 3 was 3x slower)."""
    out[...] = rgb.transpose(0, 3, 1, 2)
    out /= np.float32(255.0)
    out -= mean[:, None, None]
    out /= std[:, None, None]


def split_output(
    out: np.ndarray, n_classes: int, has_familiarity: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """A prediction graph's output ``[batch, classes (+ 1)]`` -> (probabilities,
    familiarity or None). The familiarity, when the model has one, is the last column."""
    out = np.asarray(out, dtype=np.float32)
    width = n_classes + int(has_familiarity)
    if out.ndim != 2 or out.shape[1] != width:
        raise ValueError(
            f"the model's output has shape {out.shape}, not [batch, {width}] for its "
            f"{n_classes} classes" + (" and familiarity" if has_familiarity else "")
        )
    if not has_familiarity:
        return out, None
    return out[:, :n_classes], out[:, n_classes]


def unknown_reason(
    top_probability: float,
    confidence_threshold: float,
    familiarity: float | None = None,
    familiarity_threshold: float = -1.0,
) -> str:
    """The one rule for "unknown", with its reason: "unfamiliar" when the image's
    familiarity is strictly below the familiarity threshold (unlike every training image),
    else "unsure" when the top probability is strictly below the confidence threshold (the
    run's --unknown-precision), else "" (answered). A value equal to a threshold is
    answered; thresholds of -1 and 0 answer everything."""
    if familiarity is not None and familiarity < familiarity_threshold:
        return "unfamiliar"
    if top_probability < confidence_threshold:
        return "unsure"
    return ""


def is_unknown(
    top_probability: float,
    confidence_threshold: float,
    familiarity: float | None = None,
    familiarity_threshold: float = -1.0,
) -> bool:
    """Whether the answer is "unknown" (:func:`unknown_reason` gives why)."""
    return bool(
        unknown_reason(top_probability, confidence_threshold, familiarity, familiarity_threshold)
    )


def rank_classes(
    probs: np.ndarray,
    classes: Sequence[str],
    top_k: int,
    unknown_threshold: float,
    familiarity: float | None = None,
    familiarity_threshold: float = -1.0,
) -> tuple[list[tuple[str, float]], bool]:
    """The answer for one image: its ``top_k`` classes and whether it is "unknown".

    ``probs`` is the image's probability vector (one entry per class, in the order of
    ``classes``). Returns ``(top, unknown)``: ``top`` holds ``(class, probability)`` pairs,
    most probable first, ``min(top_k, len(classes))`` of them but at least one; equal
    probabilities keep the order of ``classes``. ``unknown`` follows :func:`is_unknown`
    (top probability below ``unknown_threshold``, or ``familiarity`` below
    ``familiarity_threshold``).

    This is the one place graft turns probabilities into an answer (``graft predict``,
    ``graft serve`` and exported models all call it), so they cannot disagree.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(p) != len(classes) or not len(classes):
        raise ValueError(f"{len(p)} probabilities for {len(classes)} classes")
    k = max(1, min(int(top_k), len(classes)))
    order = np.argsort(-p, kind="stable")[:k]
    top = [(classes[j], float(p[j])) for j in order]
    fam = None if familiarity is None else float(familiarity)
    return top, is_unknown(top[0][1], unknown_threshold, fam, familiarity_threshold)


class ExportedModel:
    """An export folder (``graft export``) as a predictor: images in, calibrated
    probabilities out. ``threads`` caps the CPU threads the engine uses; ``unknown=False``
    answers every image with its top class (no "unknown"). Raises :class:`ExportError` when
    the folder cannot be used."""

    def __init__(self, folder: str | Path, threads: int | None = None, unknown: bool = True):
        self.folder = Path(folder)
        self.unknown = unknown
        meta_path = self.folder / METADATA_FILE
        if not meta_path.is_file():
            raise ExportError(
                f"{meta_path} is missing: point at a folder written by `graft export`."
            )
        again = "export the run again (graft export RUN --force)"
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
            self.format: str = self.meta["format"]
            pre = self.meta["preprocessing"]
            self.img_size: int = int(pre["size"])
            self.mean, self.std = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
            self.trim = bool(pre.get("trim", False))
            self.detail = int(pre.get("detail_size", 0))
            self.classes: list[str] = [str(c) for c in self.meta["classes"]]
            self.unknown_threshold: float = float(self.meta.get("unknown_threshold", 0.0))
            familiarity = self.meta.get("familiarity")
            threshold = familiarity.get("threshold") if isinstance(familiarity, dict) else None
            if familiarity is not None and (
                isinstance(threshold, bool) or not isinstance(threshold, int | float)
            ):
                raise ValueError("familiarity must be null or an object with a threshold")
            self.has_familiarity = familiarity is not None
            self.familiarity_threshold = -1.0 if threshold is None else float(threshold)
            model_path = self.folder / MODEL_FILES[self.format]
            if not (
                self.classes
                and 0 < self.img_size <= 4096
                and 0 <= self.detail <= 4096
                and len(self.mean) == len(self.std) == 3
                and all(np.isfinite(self.mean))
                and all(np.isfinite(s) and s > 0 for s in self.std)
                and 0.0 <= self.unknown_threshold <= 1.0
                and -1.0 <= self.familiarity_threshold <= 1.0
            ):
                raise ValueError("classes, sizes, mean, std or a threshold out of range")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{meta_path} is damaged ({exc!r}): {again}.") from exc
        self.preprocessing = Preprocessing(
            self.img_size, tuple(self.mean), tuple(self.std), self.trim, self.detail
        )
        if not model_path.is_file():
            raise ExportError(f"{model_path} is missing: {again}.")
        try:
            self._run = self._load(model_path, threads)
        except ImportError as exc:
            package = ENGINE_PACKAGES[self.format]
            raise ExportError(
                f"The {self.format} export needs the {package} package: pip install {package}."
            ) from exc
        except Exception as exc:  # each engine has its own errors for a damaged model file
            raise ExportError(f"Could not load {model_path} ({exc}): {again}.") from exc
        # One blank image: the model's output must have the columns graft.json describes
        # (a column per class, then the familiarity), or every prediction would fail later.
        blank = np.zeros((1, 3, self.img_size, self.img_size), dtype=np.float32)
        try:
            split_output(self._run(blank), len(self.classes), self.has_familiarity)
        except Exception as exc:
            raise ExportError(f"{model_path} does not match {meta_path} ({exc}): {again}.") from exc

    def _load(self, path: Path, threads: int | None) -> Any:
        if self.format == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            self.engine = "ONNX Runtime"
            return lambda x: session.run(None, {name: x})[0]
        if self.format == "openvino":
            import openvino as ov

            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # bf16 CPUs: keep parity
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = ov.Core().compile_model(str(path), "CPU", config)
            self.engine = "OpenVINO"
            return lambda x: compiled(x)[0]
        if self.format == "torchscript":
            import torch

            if threads:
                torch.set_num_threads(threads)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice
                module = torch.jit.load(str(path), map_location="cpu").eval()
            self.engine = "TorchScript"

            def run(x: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return module(torch.from_numpy(x)).numpy()

            return run
        raise ValueError(f"unknown export format {self.format!r} in {self.folder}")

    def decode(self, source: str | Path | bytes) -> Image.Image:
        return load_image(source, self.img_size)

    def predict_scores_images(
        self, images: Sequence[Image.Image]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated class probabilities ``[len(images), len(classes)]`` and the images'
        familiarity ``[len(images)]`` (None when the model has no familiarity score)."""
        if not images:
            empty = np.zeros(0, dtype=np.float32) if self.has_familiarity else None
            return np.zeros((0, len(self.classes)), dtype=np.float32), empty
        x = preprocess(images, self.preprocessing)
        return split_output(self._run(x), len(self.classes), self.has_familiarity)

    def predict_proba_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Calibrated class probabilities, ``[len(images), len(classes)]``."""
        return self.predict_scores_images(images)[0]

    def predict_proba(self, sources: Sequence[str | Path | bytes]) -> np.ndarray:
        """Probabilities for image files or bytes; raises on the first one that cannot be
        read (:meth:`predict` answers the others and names it)."""
        return self.predict_proba_images([self.decode(s) for s in sources])

    def predict(
        self, sources: Sequence[str | Path | bytes], top_k: int = 3, batch_size: int = 32
    ) -> list[dict]:
        """Per image, in order: ``label`` ("unknown" below the threshold) and the ``top``
        classes, or ``error`` (why it could not be read or predicted): one bad image never
        stops the others. Images are decoded ``batch_size`` at a time, so memory stays that
        of one batch."""
        sources, step = list(sources), max(1, int(batch_size))
        out: list[dict] = []
        for start in range(0, len(sources), step):
            results: list[dict | None] = []
            images = []
            for source in sources[start : start + step]:
                try:
                    images.append(self.decode(source))
                    results.append(None)
                except Exception as exc:  # Pillow raises many kinds on bad data
                    results.append({"error": describe_error(exc)})
            probs, familiarity = self.predict_scores_images(images)
            rows = iter(range(len(images)))
            for r in results:
                if r is None:
                    i = next(rows)
                    r = self._answer(
                        probs[i], None if familiarity is None else familiarity[i], top_k
                    )
                out.append(r)
        return out

    def _answer(self, probs: np.ndarray, familiarity: float | None, top_k: int) -> dict:
        if not np.isfinite(probs).all() or (
            familiarity is not None and not np.isfinite(familiarity)
        ):
            return {"error": NON_FINITE}
        top, unknown = rank_classes(
            probs,
            self.classes,
            top_k,
            self.unknown_threshold if self.unknown else 0.0,
            familiarity,
            self.familiarity_threshold if self.unknown else -1.0,
        )
        answer: dict[str, Any] = {
            "label": "unknown" if unknown else top[0][0],
            "top": [{"class": c, "probability": prob} for c, prob in top],
        }
        if familiarity is not None:
            answer["familiarity"] = float(familiarity)
        return answer


def _shown(text: str) -> str:
    """A path as printable text (file names need not be valid UTF-8)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    unknown, rest = True, []
    while args:  # --unknown on|off (or --unknown=off) anywhere: off answers every image
        arg = args.pop(0)
        if arg == "--unknown" or arg.startswith("--unknown="):
            value = arg.partition("=")[2] if "=" in arg else (args.pop(0) if args else "")
            if value not in ("on", "off"):
                print("graft_runtime: error: --unknown takes on or off", file=sys.stderr)
                return EXIT_USAGE
            unknown = value == "on"
        else:
            rest.append(arg)
    args = rest
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print(
            "usage: python graft_runtime.py [--unknown on|off] EXPORT_DIR IMAGE...",
            file=sys.stderr,
        )
        return 0 if args[:1] in (["-h"], ["--help"]) else EXIT_USAGE
    try:
        model = ExportedModel(args[0], unknown=unknown)
    except ExportError as exc:
        print(f"graft_runtime: error: {exc}", file=sys.stderr)
        return EXIT_EXPORT
    failed = 0
    for path, result in zip(args[1:], model.predict(args[1:]), strict=True):
        if "error" in result:
            failed += 1
            print(f"{_shown(path)}: error: {result['error']}")
            continue
        best = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top"])
        if "familiarity" in result:
            best += f"; familiarity {result['familiarity']:.2f}"
        print(f"{_shown(path)}: {result['label']} ({best})")
    if failed:
        print(
            f"graft_runtime: {failed} of {len(args) - 1} file(s) could not be predicted "
            "(their lines say why).",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
