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

or as a script: ``python graft_runtime.py EXPORT_DIR IMAGE...``.
"""

from __future__ import annotations

import io
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageOps

#: the JSON file beside every exported model: preprocessing, labels, calibration, metrics
METADATA_FILE = "graft.json"
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}


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
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits rather than clipping everything to white.
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max() if arr.size and arr.max() > 0 else 1.0
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


def preprocess(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    trim: bool = False,
) -> np.ndarray:
    """RGB images -> a float32 NCHW batch: with ``trim``, uniform borders cropped first
    (:func:`trim_background`); the whole image resized to ``size`` x ``size`` (bilinear with
    antialiasing, as torchvision's ``Resize`` does on a PIL image), scaled to [0, 1], then
    normalised per channel."""
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, im in enumerate(images):
        if trim:
            im = trim_background(im)
        resized = im.resize((size, size), Image.Resampling.BILINEAR)
        x = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
        batch[i] = ((x - m) / s).transpose(2, 0, 1)
    return batch


def rank_classes(
    probs: np.ndarray, classes: Sequence[str], top_k: int, unknown_threshold: float
) -> tuple[list[tuple[str, float]], bool]:
    """The answer for one image: its ``top_k`` classes and whether it is "unknown".

    ``probs`` is the image's probability vector (one entry per class, in the order of
    ``classes``). Returns ``(top, unknown)``: ``top`` holds ``(class, probability)`` pairs,
    most probable first, ``min(top_k, len(classes))`` of them but at least one; equal
    probabilities keep the order of ``classes``. ``unknown`` is true when the top
    probability is strictly below ``unknown_threshold``: a probability equal to the
    threshold is answered, and a threshold of 0 answers everything.

    This is the one place graft turns probabilities into an answer (``graft predict``,
    ``graft serve`` and exported models all call it), so they cannot disagree.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(p) != len(classes) or not len(classes):
        raise ValueError(f"{len(p)} probabilities for {len(classes)} classes")
    k = max(1, min(int(top_k), len(classes)))
    order = np.argsort(-p, kind="stable")[:k]
    top = [(classes[j], float(p[j])) for j in order]
    return top, bool(top[0][1] < unknown_threshold)


class ExportedModel:
    """An export folder (``graft export``) as a predictor: images in, calibrated
    probabilities out. ``threads`` caps the CPU threads the engine uses."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        meta_path = self.folder / METADATA_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} is missing: point at a folder written by `graft export`."
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.format: str = self.meta["format"]
        pre = self.meta["preprocessing"]
        self.img_size: int = int(pre["size"])
        self.mean, self.std = pre["mean"], pre["std"]
        self.trim = bool(pre.get("trim", False))
        self.classes: list[str] = list(self.meta["classes"])
        self.unknown_threshold: float = float(self.meta.get("unknown_threshold", 0.0))
        self._run = self._load(self.folder / MODEL_FILES[self.format], threads)

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

    def predict_proba_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Calibrated class probabilities, ``[len(images), len(classes)]``."""
        if not images:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        x = preprocess(images, self.img_size, self.mean, self.std, self.trim)
        return np.asarray(self._run(x), dtype=np.float32)

    def predict_proba(self, sources: Sequence[str | Path | bytes]) -> np.ndarray:
        return self.predict_proba_images([self.decode(s) for s in sources])

    def predict(self, sources: Sequence[str | Path | bytes], top_k: int = 3) -> list[dict]:
        """Per image: ``label`` ("unknown" below the threshold) and the ``top`` classes."""
        out = []
        for p in self.predict_proba(sources):
            top, unknown = rank_classes(p, self.classes, top_k, self.unknown_threshold)
            out.append(
                {
                    "label": "unknown" if unknown else top[0][0],
                    "top": [{"class": c, "probability": prob} for c, prob in top],
                }
            )
        return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python graft_runtime.py EXPORT_DIR IMAGE...", file=sys.stderr)
        return 2
    model = ExportedModel(args[0])
    for path, result in zip(args[1:], model.predict(args[1:]), strict=True):
        best = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top"])
        print(f"{path}: {result['label']} ({best})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
