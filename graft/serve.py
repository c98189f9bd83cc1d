"""``graft serve``: a trained run (or an export folder) as an HTTP API with a web page.

    POST /predict   images as multipart field ``file`` (repeat it for several) or JSON
                    ``{"images": ["<base64>", ...]}`` -> top-k classes, "unknown", timings
    GET  /health    liveness
    GET  /model     classes, backbone, input size, metrics, limits
    GET  /          a page to drop images on and see probability bars
    GET  /report    the run's HTML report, when it has one
    GET  /docs      OpenAPI documentation (FastAPI)

The model loads once. Requests are decoded in a thread pool while the model runs, and images
waiting for the model are batched together (never delayed for it: whatever queued during the
previous batch goes next), so both cores stay busy under load. Bodies are read into memory
with a hard size limit before anything is parsed, client file names are only echoed back,
never opened, and no route takes a path: nothing a client sends reads or writes a file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from PIL import Image

from . import __version__
from .errors import RunFolderError
from .rundir import REPORT, SUMMARY, RunDir
from .runtime import METADATA_FILE, rank_classes

MB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    max_mb: float = 20.0  #: largest accepted image file
    max_files: int = 16  #: most images in one request
    top_k: int = 3  #: classes returned per image unless the request asks otherwise
    max_batch: int = 32  #: most images the model runs at once

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)

    @property
    def max_body(self) -> int:
        # every file at its limit, base64's 4/3 (JSON), and room for the form's own headers
        return self.max_bytes * self.max_files * 4 // 3 + 64 * 1024


class ServedModel:
    """A run folder (graft's own Predictor) or an export folder (``graft_runtime``) behind one
    interface: ``decode(bytes)`` and ``predict_proba(images)``."""

    def __init__(self, source: str | Path):
        self.source = Path(source)
        self.warm_up: Callable[[int], None] = lambda max_batch: None
        if (self.source / METADATA_FILE).is_file():
            from .runtime import ExportedModel

            exported = ExportedModel(self.source)
            self.kind, self.engine = f"export ({exported.format})", exported.engine
            self.classes, self.img_size = exported.classes, exported.img_size
            self.unknown_threshold = exported.unknown_threshold
            self.backbone = exported.meta.get("backbone", "?")
            self.metrics = exported.meta.get("metrics", {})
            self.decode: Callable[[bytes], Image.Image] = exported.decode
            self.predict_proba: Callable[[Sequence[Image.Image]], np.ndarray] = (
                exported.predict_proba_images
            )
            self.folder = self.source
        else:
            from .model import resolve_model_file
            from .predict import Predictor
            from .runtime import load_image

            predictor = Predictor.from_run(self.source)
            info = predictor.info
            self.kind, self.engine = "run", predictor.runner.name
            self.classes, self.img_size = list(info.classes), info.img_size
            self.unknown_threshold = info.unknown_threshold
            self.backbone = info.backbone
            self.folder = resolve_model_file(self.source).parent
            data = RunDir(self.folder).read_optional(SUMMARY) or {}
            self.metrics = {k: data[k] for k in ("test", "open_set", "calibration") if k in data}
            self.decode = lambda raw: load_image(raw, info.img_size)
            self.predict_proba = predictor.predict_proba_images
            self.warm_up = predictor.runner.warm_up
        report = self.folder / REPORT
        self.report: Path | None = report if report.is_file() else None
        self.name = self.folder.name

    def describe(self, settings: ServeSettings) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "engine": self.engine,
            "backbone": self.backbone,
            "input_size": self.img_size,
            "classes": self.classes,
            "unknown_threshold": self.unknown_threshold,
            "metrics": self.metrics,
            "report": "/report" if self.report else None,
            "limits": asdict(settings),
            "graft_version": __version__,
        }


class Batcher:
    """Runs ``fn`` on the images of all requests waiting at that moment, one batch at a time,
    in a worker thread (OpenVINO, ONNX Runtime and PyTorch release the GIL while they
    compute)."""

    def __init__(self, fn: Callable[[list[Image.Image]], np.ndarray], max_batch: int):
        self.fn, self.max_batch = fn, max_batch
        self.queue: asyncio.Queue[tuple[list[Image.Image], asyncio.Future]] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, images: list[Image.Image]) -> np.ndarray:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def _run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0][0])
            while size < self.max_batch and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                size += len(jobs[-1][0])
            images = [im for job in jobs for im in job[0]]
            try:
                probs = await asyncio.to_thread(self.fn, images)
            except Exception as exc:  # the requests in this batch fail; the server goes on
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for batch, future in jobs:
                if not future.done():
                    future.set_result(probs[start : start + len(batch)])
                start += len(batch)


# ----------------------------------------------------------------------------- requests


@dataclass
class Upload:
    name: str
    data: bytes


def _client_name(name: str | None, index: int) -> str:
    """Only the last part of what the client calls its file, for echoing back."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    return base[:200] or f"image-{index + 1}"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413,
            f"Request body is {int(declared) / MB:.1f} MB; the limit is "
            f"{limit / MB:.1f} MB (see GET /model, 'limits').",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"Request body exceeds the {limit / MB:.1f} MB limit.")
        chunks.append(chunk)
    return b"".join(chunks)


async def _from_multipart(headers: Any, body: bytes) -> list[Upload]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    class InMemory(MultiPartParser):
        spool_max_size = 1 << 62  # the body is already bounded and in memory: no temp files

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await InMemory(headers, stream(), max_files=10_000, max_fields=10_000).parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"Malformed multipart body: {exc.message}") from exc
    uploads = []
    for key, value in form.multi_items():
        if key not in ("file", "files"):
            continue
        if not isinstance(value, UploadFile):
            raise HTTPException(400, f"Form field {key!r} must be a file upload, not text.")
        uploads.append(Upload(_client_name(value.filename, len(uploads)), await value.read()))
    return uploads


def _from_json(body: bytes) -> list[Upload]:
    try:
        payload = json.loads(body or b"null")
    except ValueError as exc:
        raise HTTPException(400, f"The body is not valid JSON: {exc}.") from exc
    items = payload.get("images") if isinstance(payload, dict) else None
    if items is None and isinstance(payload, dict) and "image" in payload:
        items = [payload["image"]]
    if not isinstance(items, list):
        raise HTTPException(
            400, 'JSON must be {"images": ["<base64>", ...]} (or objects {"name", "data"}).'
        )
    uploads = []
    for i, item in enumerate(items):
        name, data = (
            (item.get("name"), item.get("data")) if isinstance(item, dict) else (None, item)
        )
        if not isinstance(data, str):
            raise HTTPException(400, f"images[{i}] must be a base64 string.")
        if data.startswith("data:") and "," in data:
            data = data.split(",", 1)[1]  # a data URL, as a browser's FileReader makes
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(400, f"images[{i}] is not valid base64 ({exc}).") from exc
        uploads.append(Upload(_client_name(name, i), raw))
    return uploads


def _decode(model: ServedModel, upload: Upload) -> tuple[Image.Image | None, int, str]:
    """(image, 0, "") or (None, HTTP status, reason)."""
    from .data import decode_error_kind, describe_decode_error

    try:
        return model.decode(upload.data), 0, ""
    except Exception as exc:
        kind, reason = decode_error_kind(exc), describe_decode_error(exc)
        if kind == "too_large":
            return None, 413, f"{upload.name}: {reason}"
        if kind == "not_image":
            return None, 415, f"{upload.name} is not an image (or an unsupported format)."
        return None, 422, f"{upload.name} could not be decoded: {reason}"


# ----------------------------------------------------------------------------- the app


def _request_body_docs() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "one or more images (repeat the field)",
                            }
                        },
                        "required": ["file"],
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "byte"},
                                "description": "base64 images (or data URLs)",
                            }
                        },
                        "required": ["images"],
                    }
                },
            },
        }
    }


async def _read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """The images of one /predict request, within ``settings``' limits (else an HTTP error)."""
    body = await _read_body(request, settings.max_body)
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        uploads = await _from_multipart(request.headers, body)
    elif ctype.startswith("application/json"):
        uploads = _from_json(body)
    else:
        raise HTTPException(
            415,
            "Send images as multipart/form-data (field 'file', repeated for several) or "
            'as JSON {"images": ["<base64>", ...]}; got Content-Type '
            f"{ctype or 'none'!r}.",
        )
    if not uploads:
        raise HTTPException(400, "No image in the request: add a multipart field named 'file'.")
    if len(uploads) > settings.max_files:
        raise HTTPException(
            413, f"{len(uploads)} images in one request; the limit is {settings.max_files}."
        )
    for up in uploads:
        if not up.data:
            raise HTTPException(400, f"{up.name} is empty (0 bytes).")
        if len(up.data) > settings.max_bytes:
            raise HTTPException(
                413,
                f"{up.name} is {len(up.data) / MB:.1f} MB; the limit is "
                f"{settings.max_mb:g} MB per image.",
            )
    return uploads


def _answers(
    model: ServedModel,
    uploads: list[Upload],
    decoded: list[tuple[Image.Image | None, int, str]],
    probs: np.ndarray,
    top_k: int,
) -> list[dict[str, Any]]:
    """One JSON answer per upload, in order: its top classes and label, or its error.
    ``probs`` has a row for each upload that decoded, in order."""
    results, row = [], 0
    for up, (im, _, reason) in zip(uploads, decoded, strict=True):
        if im is None:
            results.append({"name": up.name, "error": reason})
            continue
        top, unknown = rank_classes(probs[row], model.classes, top_k, model.unknown_threshold)
        row += 1
        results.append(
            {
                "name": up.name,
                "label": "unknown" if unknown else top[0][0],
                "unknown": unknown,
                "top": [{"class": c, "probability": round(p, 6)} for c, p in top],
            }
        )
    return results


def _add_predict_route(
    app: FastAPI, model: ServedModel, settings: ServeSettings, batcher: Batcher
) -> None:
    """POST /predict: decode in a thread pool, run the model through ``batcher``."""

    @app.post("/predict", openapi_extra=_request_body_docs())
    async def predict(
        request: Request,
        top_k: int = Query(settings.top_k, ge=1, le=1000, description="classes per image"),
    ) -> dict[str, Any]:
        started = time.perf_counter()
        uploads = await _read_uploads(request, settings)
        decoded = await asyncio.to_thread(lambda: [_decode(model, up) for up in uploads])
        images = [im for im, _, _ in decoded if im is not None]
        if not images:
            status, reason = decoded[0][1], decoded[0][2]
            raise HTTPException(
                status, reason if len(decoded) == 1 else f"No usable image: {reason}"
            )
        t_decoded = time.perf_counter()
        probs = await batcher.submit(images)
        t_done = time.perf_counter()
        return {
            "predictions": _answers(model, uploads, decoded, probs, top_k),
            "timing_ms": {
                "decode": round(1000 * (t_decoded - started), 2),
                "inference": round(1000 * (t_done - t_decoded), 2),
                "total": round(1000 * (time.perf_counter() - started), 2),
            },
        }


def _add_static_routes(app: FastAPI, model: ServedModel, settings: ServeSettings) -> None:
    """GET /, /health, /model and /report: the page, liveness, the model, its report."""
    page = (Path(__file__).parent / "web" / "index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "classes": len(model.classes)}

    @app.get("/model")
    async def describe() -> dict[str, Any]:
        return model.describe(settings)

    @app.get("/report", response_class=HTMLResponse)
    async def report() -> FileResponse:
        if model.report is None:
            raise HTTPException(404, "This model has no report.html (run `graft report RUN`).")
        return FileResponse(model.report, media_type="text/html")


def create_app(source: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``source`` (a run folder or an export folder)."""
    settings = settings or ServeSettings()
    source = Path(source)
    if not source.exists():
        raise RunFolderError(f"{source} does not exist: give a run folder or an export folder.")
    model = ServedModel(source)
    model.warm_up(settings.max_batch)
    batcher = Batcher(model.predict_proba, settings.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title=f"graft: {model.name}",
        version=__version__,
        description=f"Image classifier ({model.backbone}, {len(model.classes)} classes).",
        lifespan=lifespan,
    )
    app.state.model, app.state.settings = model, settings
    _add_static_routes(app, model, settings)
    _add_predict_route(app, model, settings, batcher)
    return app


def serve(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (uvicorn, one process: the model loads once)."""
    import uvicorn

    app = create_app(source, settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["Batcher", "ServeSettings", "ServedModel", "create_app", "serve"]
