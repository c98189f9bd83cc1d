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

The folder is written beside its destination and renamed into place, so a failed export
never leaves half a model behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .engines import ONNX_ATOL, Probabilities, export_onnx
from .errors import RunExistsError, UsageError
from .model import GraftModel, load_model, resolve_model_file
from .runtime import METADATA_FILE, MODEL_FILES

FORMATS = tuple(MODEL_FILES)
#: largest difference in probabilities allowed between an export and graft's own predict,
#: checked on real images by tests/test_export.py
EXPORT_ATOL = {"onnx": ONNX_ATOL, "openvino": ONNX_ATOL, "torchscript": 1e-5}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_network(model: GraftModel, fmt: str, folder: Path) -> Path:
    graph = Probabilities(model).eval().to("cpu", memory_format=torch.contiguous_format)
    size = model.info.img_size
    target = folder / MODEL_FILES[fmt]
    if fmt == "onnx":
        export_onnx(graph, size, target, output_name="probabilities")
    elif fmt == "openvino":
        try:
            import openvino as ov
        except ImportError as exc:
            raise UsageError(
                "The openvino format needs the OpenVINO package: pip install 'graft[openvino]'."
            ) from exc
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(graph, size, Path(tmp) / "model.onnx", "probabilities")
            ov.save_model(ov.convert_model(str(onnx_path)), str(target), compress_to_fp16=False)
    elif fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice
            traced = torch.jit.trace(graph, torch.zeros(1, 3, size, size))
            torch.jit.save(traced, str(target))
    else:
        raise UsageError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_metadata(model: GraftModel, fmt: str, run: Path, model_file: Path) -> dict[str, Any]:
    info = model.info
    summary = _read_json(run / "summary.json")
    return {
        "graft_export": 1,
        "graft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": fmt,
        "model_file": model_file.name,
        "model_sha256": _sha256(model_file),
        "backbone": info.backbone,
        "input": {
            "name": "images",
            "shape": ["batch", 3, info.img_size, info.img_size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
        },
        "output": {
            "name": "probabilities",
            "shape": ["batch", len(info.classes)],
            "meaning": "calibrated class probabilities: softmax(logits / temperature); the "
            "temperature is already inside the model",
        },
        "preprocessing": {
            "decode": "8-bit RGB; EXIF orientation applied; first frame of animations; "
            "transparency composited on white; JPEG decoded at reduced scale (Pillow draft) "
            "when larger than the input size",
            "trim_rule": "when trim: crop the background (top-left pixel's colour, tolerance 12) "
            "to a square around the object with an 8% margin, unless it fills 90% of the frame",
            "resize": "whole image to size x size, bilinear with antialiasing (Pillow), no crop",
            "trim": info.trim,
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
        "tolerance": {"max_abs_prob_diff_vs_graft": EXPORT_ATOL[fmt]},
        "metrics": {k: summary[k] for k in ("test", "open_set", "calibration") if k in summary},
        "source_run": str(run.resolve()),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def model_card(model: GraftModel, run: Path, meta: dict[str, Any]) -> str:
    """A Markdown model card written from the run's own files (nothing is claimed that the
    run did not measure)."""
    info = model.info
    summary = _read_json(run / "summary.json")
    config = _read_json(run / "config.json")
    evaluation = _read_json(run / "evaluation.json")
    lines = [
        f"# Model card: {run.name}",
        "",
        f"An image classifier made by graft {__version__}: a new head grafted onto the "
        f"pretrained **{info.backbone}** backbone, trained with the backbone frozen and then "
        "fine-tuned. Exported as "
        f"**{meta['format']}** (`{meta['model_file']}`, sha256 `{meta['model_sha256'][:16]}…`).",
        "",
        "## Input and output",
        "",
        f"- Input: RGB images, resized whole to {info.img_size}x{info.img_size}, scaled to "
        f"[0, 1], normalised with mean {list(info.mean)} and std {list(info.std)} "
        "(see `graft.json`; `graft_runtime.py` does it exactly).",
        f"- Output: calibrated probabilities over {len(info.classes)} classes "
        f"(temperature {info.temperature:.3f} is inside the model).",
        f'- Unknown: answer "unknown" when the top probability is below '
        f"{info.unknown_threshold:.3f} (chosen on validation data)."
        if info.unknown_threshold > 0
        else "- Unknown: no threshold (validation gave no basis for one); every image gets "
        "a class.",
        "",
        "## Data",
        "",
    ]
    counts = summary.get("counts", {})
    split = summary.get("split", {})
    if config.get("data_root"):
        lines.append(f"- Source folder: `{config['data_root']}`")
    if counts:
        lines.append(f"- {sum(counts.values())} images in {len(counts)} classes:")
        lines += [f"  - {c}: {n}" for c, n in counts.items()]
    else:
        lines.append(f"- Classes: {', '.join(info.classes)}")
    if split:
        grouping = _read_json(run / "audit.json").get("grouping", "")
        grouped = (
            "" if not grouping or grouping.startswith("none") else f" ({grouping.rstrip('.')})"
        )
        lines.append(
            f"- Split (seed {config.get('seed', '?')}){grouped}: "
            + ", ".join(f"{k} {v}" for k, v in split.items())
        )
    if summary.get("skipped_files"):
        lines.append(f"- {summary['skipped_files']} unreadable file(s) were skipped.")
    lines += ["", "## Metrics", ""]
    test = summary.get("test")
    if test:
        lo, hi = test["accuracy_ci95"]
        lines.append(
            f"- Held-out test accuracy: **{_pct(test['accuracy'])}** "
            f"(95% interval {_pct(lo)}-{_pct(hi)}, n={test['n']})."
        )
    per_class = evaluation.get("per_class", {})
    if per_class:
        lines += [
            "",
            "| class | precision | recall (95% interval) | F1 | images |",
            "|---|---|---|---|---|",
        ]
        for c, m in per_class.items():
            lo, hi = m["recall_ci95"]
            lines.append(
                f"| {c} | {_pct(m['precision'])} | {_pct(m['recall'])} ({_pct(lo)}-{_pct(hi)})"
                f" | {m['f1']:.3f} | {m['support']} |"
            )
        lines.append("")
    cal = summary.get("calibration", {})
    if cal:
        fitted = "fitted on validation" if cal.get("fitted") else "not fitted"
        lines.append(
            f"- Calibration: temperature {cal.get('temperature', 1.0):.3f} ({fitted}); "
            f"expected calibration error on test {cal.get('test_ece', float('nan')):.3f}."
        )
    for other in sorted(run.glob("eval-*/evaluation.json")):
        ev = _read_json(other)
        if "accuracy" in ev:
            lo, hi = ev["accuracy_ci95"]
            lines.append(
                f"- Images from elsewhere (`{other.parent.name}`): {_pct(ev['accuracy'])} "
                f"(95% interval {_pct(lo)}-{_pct(hi)}, n={ev['n']})."
            )
    lines += [
        "",
        "## Intended use",
        "",
        f"Sorting images into the {len(info.classes)} classes above when they look like the "
        "training images. Every prediction comes with its probability; treat low-probability "
        'answers (and "unknown") as a request for a person to look.',
        "",
        "## Limits",
        "",
        "- It only knows these classes: an image of anything else still gets one of them "
        "(the unknown threshold catches some, not all).",
        "- Held-out accuracy measures images like the training ones. Images from another "
        "source (other cameras, drawings, photos of screens) can score much lower.",
    ]
    audit = summary.get("audit", {})
    for finding in audit.get("findings", []):
        lines.append(f"- Audit: {finding}")
    diagnosis = summary.get("diagnosis", {})
    if diagnosis:
        lines.append(f"- Training diagnosis: {diagnosis['verdict']}.")
    lines += [f"- Note: {n}" for n in diagnosis.get("notes", [])]
    lines += [
        "",
        "## How to use",
        "",
        "```",
        "python graft_runtime.py EXPORT_DIR image.jpg   # numpy + Pillow + the engine only",
        "graft serve EXPORT_DIR        # HTTP API and web page",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_run(
    run: str | Path, fmt: str = "onnx", out: str | Path | None = None, force: bool = False
) -> Path:
    """Write ``run``'s model as ``fmt`` into ``out`` (default ``RUN/export-FMT``)."""
    if fmt not in FORMATS:
        raise UsageError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    weights = resolve_model_file(run)
    run_dir = weights.parent
    out = Path(out) if out is not None else run_dir / f"export-{fmt}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise RunExistsError(
                f"{out} already exists. Choose another --out, or pass --force to replace it."
            )
        if not (out / METADATA_FILE).is_file():
            raise RunExistsError(
                f"{out} exists and is not a graft export; graft will not delete it. "
                "Choose another --out."
            )
    model = load_model(weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model_file = _write_network(model, fmt, staging)
        meta = export_metadata(model, fmt, run_dir, model_file)
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / "MODEL_CARD.md").write_text(model_card(model, run_dir, meta))
        shutil.copyfile(Path(__file__).with_name("runtime.py"), staging / "graft_runtime.py")
        if (run_dir / "report.html").is_file():
            shutil.copyfile(run_dir / "report.html", staging / "report.html")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


__all__ = ["EXPORT_ATOL", "FORMATS", "export_run", "model_card"]
