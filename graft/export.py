"""``graft export``: a trained run as a portable model folder.

An export folder holds everything another program needs and nothing from training:

- the network as ONNX, OpenVINO IR or TorchScript, ending in the calibrated softmax, so its
  output *is* the probabilities graft's own predict reports;
- ``graft.json``: input size, normalisation, resize rule, class names, temperature, unknown
  threshold, metrics and the tolerance the export was checked to;
- ``graft_runtime.py``: graft's image decoding and preprocessing with numpy and Pillow only,
  runnable as a script (``python graft_runtime.py EXPORT_DIR IMAGE...``);
- ``MODEL_CARD.md``: data, classes, metrics with intervals, intended use and limits;
- ``report.html`` when the run has one (``graft serve`` links to it).

``--int8`` (ONNX and OpenVINO) quantizes the network to INT8, calibrated on the run's
training images, and records its agreement with fp32 on the held-out split in ``graft.json``
(``int8``) and the model card (graft.quantize). It is never the default: it moves the
probabilities, by an amount each export states.

``graft.json`` lists the files the export wrote (``files``). The folder is written beside its
destination and renamed into place, so a failed export never leaves half a model behind;
``--force`` over an earlier export replaces only the files graft wrote there and keeps
anything the user added.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .engines import ONNX_ATOL, Probabilities, export_onnx
from .errors import (
    GraftError,
    RunExistsError,
    SystemResourceError,
    UsageError,
    os_error_message,
)
from .model import GraftModel, load_model, resolve_model_file
from .modelinfo import read_info
from .quantize import RunImages
from .report import template_environment
from .rundir import REPORT, RunDir
from .runtime import METADATA_FILE, MODEL_FILES

FORMATS = tuple(MODEL_FILES)
#: the formats ``--int8`` writes (ONNX Runtime and OpenVINO both run QDQ graphs in INT8)
INT8_FORMATS = ("onnx", "openvino")
#: largest difference in probabilities allowed between an export and graft's own predict,
#: checked on real images by tests/test_export.py
#: (TorchScript's fused kernels: up to 1.2e-5 measured on a ViT-Tiny with a probe-solved head)
EXPORT_ATOL = {"onnx": ONNX_ATOL, "openvino": ONNX_ATOL, "torchscript": 5e-5}
#: every name an export may write (OpenVINO's IR is model.xml plus model.bin): ``--force``
#: never deletes anything else, whatever an export's ``files`` list says
EXPORT_FILES = frozenset(
    {METADATA_FILE, "MODEL_CARD.md", "graft_runtime.py", REPORT, "model.bin", *MODEL_FILES.values()}
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def output_name(model: GraftModel) -> str:
    """The graph's output name: it says what the columns are, so a consumer that expects
    only probabilities (and takes an argmax) is not silently handed the familiarity too."""
    return "probabilities" if model.familiarity is None else "probabilities_and_familiarity"


def _write_network(model: GraftModel, fmt: str, folder: Path) -> Path:
    graph = Probabilities(model).eval().to("cpu", memory_format=torch.contiguous_format)
    size = model.info.img_size
    target = folder / MODEL_FILES[fmt]
    if fmt == "onnx":
        export_onnx(graph, size, target, output_name=output_name(model))
    elif fmt == "openvino":
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(graph, size, Path(tmp) / "model.onnx", output_name(model))
            _save_openvino(onnx_path, target)
    elif fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice
            traced = torch.jit.trace(graph, torch.zeros(1, 3, size, size))
            torch.jit.save(traced, str(target))
    else:
        raise UsageError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    return target


def _save_openvino(onnx_path: Path, target: Path) -> None:
    """An ONNX graph as OpenVINO IR; a QDQ (INT8) graph becomes FakeQuantize operations,
    which OpenVINO runs with INT8 kernels."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise UsageError(
            "The openvino format needs the OpenVINO package: pip install 'graft[openvino]'."
        ) from exc
    ov.save_model(ov.convert_model(str(onnx_path)), str(target), compress_to_fp16=False)


def _stage_int8(
    model: GraftModel, fmt: str, run_dir: Path, staging: Path, images: RunImages
) -> tuple[Path, dict[str, Any]]:
    """Write the INT8 network into ``staging`` and measure it, as the exported runtime runs
    it, against the fp32 graph on the held-out test images (graft.quantize)."""
    from .fast import OnnxEngine
    from .quantize import agreement, batches, quantize_onnx
    from .runtime import ExportedModel, ExportError, preprocess, split_output

    info = model.info
    graph = Probabilities(model).eval().to("cpu", memory_format=torch.contiguous_format)
    target = staging / MODEL_FILES[fmt]
    with tempfile.TemporaryDirectory(prefix="graft-int8-") as tmp:
        fp32 = export_onnx(graph, info.img_size, Path(tmp) / "fp32.onnx", output_name(model))
        try:
            qdq = quantize_onnx(
                fp32, Path(tmp) / "int8.onnx", lambda: batches(images.calibration, info)
            )
        except (GraftError, OSError):
            raise
        except Exception as exc:  # ONNX Runtime's quantizer on a graph it cannot handle
            raise UsageError(
                f"ONNX Runtime could not quantize this model to INT8 ({exc}); export it "
                "without --int8."
            ) from exc
        if fmt == "onnx":
            shutil.copyfile(qdq, target)
        else:
            _save_openvino(qdq, target)
        meta = export_metadata(model, fmt, run_dir, target, int8=True)
        # the export as a user loads it (graft_runtime.ExportedModel), so the agreement
        # recorded is that of the engine and graph they will run
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            exported = ExportedModel(staging)
        except ExportError as exc:
            raise UsageError(
                f"The INT8 model was written but does not load ({exc}); export without --int8."
            ) from exc
        reference = OnnxEngine(fp32)
        has_familiarity = model.familiarity is not None

        def fp32_scores(ims: list[Any]) -> tuple[Any, Any]:
            x = preprocess(ims, info.preprocessing)
            return split_output(reference.run(x), len(info.classes), has_familiarity)

        report = agreement(fp32_scores, exported.predict_scores_images, images, info)
    meta["int8"] = {
        "calibration_images": len(images.calibration),
        "calibration": "a class-balanced sample of the run's training split (its seed)",
        "quantization": "ONNX Runtime static post-training quantization: QDQ, INT8 weights "
        "per channel (7-bit range), UINT8 activations (MinMax ranges); the head, softmax and "
        "familiarity after the pooled features stay fp32",
        "engine": exported.engine,
        "compared_on": "the run's held-out test split, against the fp32 graph",
        **report,
    }
    return target, meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_metadata(
    model: GraftModel, fmt: str, run: Path, model_file: Path, int8: bool = False
) -> dict[str, Any]:
    info = model.info
    summary = _read_json(RunDir(run).summary)
    return {
        # 2: with a familiarity score the output has one more column (and another name)
        "graft_export": 2,
        "graft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": fmt,
        "precision": "int8" if int8 else "fp32",
        "model_file": model_file.name,
        "model_sha256": _sha256(model_file),
        "backbone": info.backbone,
        "input": {
            "name": "images",
            "shape": ["batch", 3, info.img_size, info.img_size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
        },
        "output": _output_description(model),
        "preprocessing": {
            "decode": "8-bit RGB; EXIF orientation applied; first frame of animations; "
            "transparency composited on white; JPEG decoded at reduced scale (Pillow draft) "
            "when larger than the input size",
            "trim_rule": "when trim: crop the background (top-left pixel's colour, tolerance 12) "
            "to a square around the object with an 8% margin, unless it fills 90% of the frame",
            "resize": "whole image to size x size, bilinear with antialiasing (Pillow), no crop",
            "detail_rule": "when detail_size > 0: after the trim, an image whose longest side "
            "is larger is downscaled to it (bilinear with antialiasing, aspect kept)",
            "trim": info.trim,
            "detail_size": info.detail_size,
            "size": info.img_size,
            "scale": "pixel / 255",
            "mean": list(info.mean),
            "std": list(info.std),
            "normalise": "(x - mean) / std per channel",
            "reference": "graft_runtime.py (the same code graft trains and predicts with)",
        },
        "classes": list(info.classes),
        "temperature": info.temperature,
        "unknown_threshold": info.unknown_threshold,
        "familiarity": (
            {
                "k": info.familiarity_k,
                "threshold": info.familiarity_threshold,
                "meaning": "cosine similarity of the image's pooled backbone features to the "
                "k-th most similar training image (the last output column); below the "
                "threshold the answer is 'unknown'",
            }
            if model.familiarity is not None
            else None
        ),
        "unknown_rule": "unknown when the top probability < unknown_threshold, or the "
        "familiarity < familiarity.threshold (graft_runtime.is_unknown)",
        "tolerance": _tolerance(fmt, int8),
        "metrics": {k: summary[k] for k in ("test", "open_set", "calibration") if k in summary},
        "source_run": str(run.resolve()),
    }


def _tolerance(fmt: str, int8: bool) -> dict[str, Any]:
    if not int8:
        return {"max_abs_prob_diff_vs_graft": EXPORT_ATOL[fmt]}
    return {
        "max_abs_prob_diff_vs_graft": None,
        "note": "INT8 is not held to graft's fp32 tolerance; how far it moved the "
        "probabilities on the held-out split is in 'int8'",
    }


def _output_description(model: GraftModel) -> dict[str, Any]:
    n = len(model.info.classes)
    out: dict[str, Any] = {
        "name": output_name(model),
        "shape": ["batch", n],
        "meaning": "calibrated class probabilities: softmax(logits / temperature); the "
        "temperature is already inside the model",
    }
    if model.familiarity is not None:
        out["shape"] = ["batch", n + 1]
        out["meaning"] += (
            f"; then, in column {n} (the last), the image's familiarity (see 'familiarity')"
        )
    return out


def _card_context(model: GraftModel, run: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The values ``model_card.md.j2`` shows, from the model and the run's own files."""
    summary = _read_json(RunDir(run).summary)
    grouping = _read_json(RunDir(run).audit).get("grouping", "")
    grouped = "" if not grouping or grouping.startswith("none") else f" ({grouping.rstrip('.')})"
    cal = summary.get("calibration", {})
    elsewhere = []
    for other in RunDir(run).evaluations():
        ev = _read_json(other)
        if "accuracy" in ev:
            elsewhere.append((other.parent.name, ev))
    return {
        "run_name": run.name,
        "graft_version": __version__,
        "info": model.info,
        "meta": meta,
        "summary": summary,
        "config": _read_json(RunDir(run).config),
        "counts": summary.get("counts", {}),
        "split": [f"{k} {v}" for k, v in summary.get("split", {}).items()],
        "grouped": grouped,
        "test": summary.get("test"),
        "per_class": _read_json(RunDir(run).evaluation).get("per_class", {}),
        "cal": cal,
        "test_ece": cal.get("test_ece", float("nan")),
        "elsewhere": elsewhere,
        "diagnosis": summary.get("diagnosis", {}),
    }


def model_card(model: GraftModel, run: Path, meta: dict[str, Any]) -> str:
    """A Markdown model card written from the run's own files (nothing is claimed that the
    run did not measure)."""
    template = template_environment(html=False).get_template("model_card.md.j2")
    return template.render(_card_context(model, run, meta))


def _replaceable(out: Path, force: bool) -> set[str] | None:
    """What an existing ``out`` allows: None when it is free (missing or an empty folder),
    else the names of graft's own files in it that ``force`` may replace. Anything that
    is not an earlier graft export is refused, even with ``force``."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not force:
        raise RunExistsError(
            f"{out} already exists. Choose another --out, or pass --force to replace it."
        )
    meta = _read_json(out / METADATA_FILE) if out.is_dir() else {}
    if not isinstance(meta, dict) or "graft_export" not in meta:
        raise RunExistsError(
            f"{out} exists and is not a graft export (no graft metadata in "
            f"{METADATA_FILE}); graft will not delete anything in it. Choose another --out."
        )
    listed = meta.get("files")
    # exports written before the manifest: graft's own names, and only those
    names = set(listed) if isinstance(listed, list) else set(EXPORT_FILES)
    return {n for n in names if n in EXPORT_FILES and (out / n).is_file()}


def _install(staging: Path, out: Path, old: set[str] | None) -> None:
    """Move the staged export into ``out``: a rename when ``out`` is free; over an earlier
    export, graft's files one by one (the metadata last) and its stale ones removed, so
    files the user added there stay."""
    if old is None:
        if out.is_dir():
            out.rmdir()  # empty
        staging.rename(out)
        return
    new = {p.name for p in staging.iterdir()}
    for name in [*sorted(new - {METADATA_FILE}), METADATA_FILE]:
        os.replace(staging / name, out / name)
    for name in old - new:  # e.g. model.xml/model.bin after switching to onnx
        (out / name).unlink(missing_ok=True)
    staging.rmdir()


def _stage(
    model: GraftModel, fmt: str, run_dir: Path, staging: Path, images: RunImages | None
) -> None:
    if images is None:
        model_file = _write_network(model, fmt, staging)
        meta = export_metadata(model, fmt, run_dir, model_file)
    else:
        model_file, meta = _stage_int8(model, fmt, run_dir, staging, images)
    (staging / "MODEL_CARD.md").write_text(model_card(model, run_dir, meta))
    shutil.copyfile(Path(__file__).with_name("runtime.py"), staging / "graft_runtime.py")
    if RunDir(run_dir).report.is_file():
        shutil.copyfile(RunDir(run_dir).report, staging / REPORT)
    # the manifest: what --force may replace next time, and nothing else
    meta["files"] = sorted({p.name for p in staging.iterdir()} | {METADATA_FILE})
    (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def export_run(
    run: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    force: bool = False,
    int8: bool = False,
    data_root: str | Path | None = None,
) -> Path:
    """Write ``run``'s model as ``fmt`` into ``out`` (default ``RUN/export-FMT``, or
    ``RUN/export-FMT-int8``). With ``force``, an earlier export there is replaced file by
    file; files the user added to it are kept, and a folder that is not a graft export is
    refused unless it is empty.

    ``int8`` (onnx, openvino) quantizes the network, calibrated on the run's training
    images and compared with fp32 on its test images (graft.json's ``int8``); both are read
    under ``data_root`` when given, else where the run was trained."""
    if fmt not in FORMATS:
        raise UsageError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    if int8 and fmt not in INT8_FORMATS:
        raise UsageError(
            f"--int8 is for the {' and '.join(INT8_FORMATS)} formats (TorchScript has no INT8 "
            "export here): use --format onnx or --format openvino, or leave out --int8."
        )
    if data_root is not None and not int8:
        raise UsageError(
            "--data-root tells --int8 where the run's images are; an fp32 export needs no "
            "images: leave it out, or add --int8."
        )
    weights = resolve_model_file(run)
    run_dir = weights.parent
    suffix = "-int8" if int8 else ""
    out = Path(out) if out is not None else run_dir / f"export-{fmt}{suffix}"
    old = _replaceable(out, force)
    images = None
    if int8:  # before the model loads: missing images are the likeliest failure
        from .quantize import run_images

        images = run_images(run_dir, read_info(weights)[1].classes, data_root)
    model = load_model(weights)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise _os_error(exc, out) from exc
    try:
        _stage(model, fmt, run_dir, staging, images)
        _install(staging, out, old)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _os_error(exc, out) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _os_error(exc: OSError, out: Path) -> GraftError:
    message = os_error_message(exc, f"write the export to {out}")
    if message:
        return SystemResourceError(message)
    return UsageError(f"Could not write the export to {out}: {exc}. Choose another --out.")


__all__ = ["EXPORT_ATOL", "FORMATS", "INT8_FORMATS", "export_run", "model_card"]
