"""``graft serve``: a trained run (or an export folder) as an HTTP API with a web page.

    POST /predict   images as multipart field ``file`` (repeat it for several) or JSON
                    ``{"images": ["<base64>", ...]}`` -> top-k classes, "unknown", timings
    GET  /health    liveness
    GET  /model     classes, backbone, input size, metrics, limits
    GET  /          a page to drop images on and see probability bars
    GET  /report    the run's HTML report, when it has one (local paths redacted)
    GET  /docs      OpenAPI documentation (Swagger UI served from graft/static: works offline)

The model loads once. Each image is decoded and turned into the model's input on one
decoding thread (so one big picture, not sixteen, is ever held at full size), and the
inputs waiting for the model are batched (never delayed for it: whatever queued during the
previous batch goes next).

This module owns the model behind the API (:class:`ServedModel`), the batching, the routes and
the uvicorn server; reading and admitting requests, and the limits (:class:`ServeSettings`),
live in graft.serve_requests. What a client can make the server hold is bounded there; here,
the request line and headers must arrive within ``header_timeout_s`` (else the connection is
closed). No route takes a path: nothing a client sends reads or writes a file.
"""

from __future__ import annotations

import asyncio
import errno
import html
import json
import math
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from . import __version__
from .errors import RunFolderError, SystemResourceError, UsageError, os_error_message
from .rundir import REPORT, SUMMARY, RunDir
from .runtime import (
    METADATA_FILE,
    NON_FINITE,
    ExportError,
    rank_classes,
    split_output,
    unknown_reason,
)
from .serve_requests import MB, Admission, ServeSettings, Upload, prepare_upload, read_uploads

STATIC = Path(__file__).parent / "static"


class ServedModel:
    """A run folder (graft's own Predictor) or an export folder (``graft_runtime``) behind one
    interface: ``prepare(bytes)`` (decode, then the model's input for that image: the full
    picture is freed at once) and ``infer(inputs)`` (the graph's output: class
    probabilities, then the familiarity when the model has one; ``split``). ``unknown=False``
    answers every image with its top class."""

    def __init__(self, source: str | Path, unknown: bool = True):
        self.source = Path(source)
        self.unknown = unknown
        self.warm_up: Callable[[int], None] = lambda max_batch: None
        self.prepare: Callable[[bytes], Any]
        self.infer: Callable[[list[Any]], np.ndarray]
        if (self.source / METADATA_FILE).is_file():
            from .runtime import ExportedModel, preprocess

            try:
                exported = ExportedModel(self.source)
            except ExportError as exc:  # a damaged export is the folder's fault: exit 6
                raise RunFolderError(str(exc)) from exc
            self.kind, self.engine = f"export ({exported.format})", exported.engine
            self.classes, self.img_size = exported.classes, exported.img_size
            self.unknown_threshold = exported.unknown_threshold
            self.has_familiarity = exported.has_familiarity
            self.familiarity_threshold = exported.familiarity_threshold
            self.backbone = exported.meta.get("backbone", "?")
            self.metrics = exported.meta.get("metrics", {})
            self.prepare = lambda raw: preprocess(
                [exported.decode(raw)],
                exported.img_size,
                exported.mean,
                exported.std,
                exported.trim,
            )[0]
            # what ExportedModel.predict_proba_images does after its own preprocess
            self.infer = lambda xs: np.asarray(exported._run(np.stack(xs)), dtype=np.float32)
            self.folder = self.source
        else:
            import torch

            from .model import resolve_model_file
            from .predict import Predictor
            from .runtime import load_image

            predictor = Predictor.from_run(self.source)  # tta=False: one view per image
            info = predictor.info
            self.kind, self.engine = "run", predictor.runner.name
            self.classes, self.img_size = list(info.classes), info.img_size
            self.unknown_threshold = info.unknown_threshold
            self.has_familiarity = predictor.has_familiarity
            self.familiarity_threshold = info.familiarity_threshold
            self.backbone = info.backbone
            self.folder = resolve_model_file(self.source).parent
            data = RunDir(self.folder).read_optional(SUMMARY) or {}
            self.metrics = {k: data[k] for k in ("test", "open_set", "calibration") if k in data}
            self.prepare = lambda raw: predictor.transform(load_image(raw, info.img_size))
            self.infer = lambda xs: predictor.runner(torch.stack(xs)).numpy()
            self.warm_up = predictor.runner.warm_up
        report = self.folder / REPORT
        self.report: Path | None = report if report.is_file() else None
        self.name = self.folder.name
        # the model's own thresholds, for /model; --unknown off answers as if they were 0/-1
        self.thresholds = (self.unknown_threshold, self.familiarity_threshold)
        if not unknown:
            self.unknown_threshold, self.familiarity_threshold = 0.0, -1.0

    def split(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``infer``'s output -> probabilities and familiarity (None without the score)."""
        return split_output(out, len(self.classes), self.has_familiarity)

    def describe(self, settings: ServeSettings) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "engine": self.engine,
            "backbone": self.backbone,
            "input_size": self.img_size,
            "classes": self.classes,
            "unknown": "on" if self.unknown else "off (every image gets its top class)",
            "unknown_threshold": self.thresholds[0],
            "familiarity_threshold": self.thresholds[1] if self.has_familiarity else None,
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


def _answers(
    model: ServedModel,
    uploads: list[Upload],
    decoded: list[tuple[Any, int, str, int]],
    output: np.ndarray,
    top_k: int,
) -> list[dict[str, Any]]:
    """One JSON answer per upload, in order: its top classes and label, or its error.
    ``output`` has a row of the model's output for each upload that decoded, in order. A row
    with NaN or infinity is that image's error (as in runtime.ExportedModel.predict), never
    numbers: JSON cannot carry them and they mean nothing."""
    probs, familiarity = model.split(output)
    results, rows = [], iter(range(len(probs)))
    for up, (im, _, reason, _) in zip(uploads, decoded, strict=True):
        if im is None:
            results.append({"name": up.name, "error": reason})
            continue
        i = next(rows)
        fam = None if familiarity is None else float(familiarity[i])
        if not np.isfinite(probs[i]).all() or (fam is not None and not np.isfinite(fam)):
            results.append({"name": up.name, "error": NON_FINITE})
            continue
        top, unknown = rank_classes(
            probs[i],
            model.classes,
            top_k,
            model.unknown_threshold,
            fam,
            model.familiarity_threshold,
        )
        answer: dict[str, Any] = {
            "name": up.name,
            "label": "unknown" if unknown else top[0][0],
            "unknown": unknown,
            "top": [{"class": c, "probability": round(p, 6)} for c, p in top],
        }
        if fam is not None:
            answer["familiarity"] = round(fam, 6)
        if unknown:  # "unfamiliar" (unlike the training images) or "unsure" (low probability)
            answer["unknown_reason"] = unknown_reason(
                top[0][1], model.unknown_threshold, fam, model.familiarity_threshold
            )
        results.append(answer)
    return results


def _add_predict_route(
    app: FastAPI, model: ServedModel, settings: ServeSettings, batcher: Batcher
) -> None:
    """POST /predict: admit, read, prepare each image in a thread, run the model (batched)."""
    admission = app.state.admission = Admission(settings)
    max_pixels = settings.max_megapixels * 1e6
    # One decoding thread, server-wide: one picture at full size at a time, and one malloc
    # arena holding its peak (glibc gives each thread its own, each kept at its high-water
    # mark). The model runs in another thread, so both cores stay busy.
    decoder = ThreadPoolExecutor(1, thread_name_prefix="graft-decode")

    async def prepare(up: Upload) -> tuple[Any, int, str, int]:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            decoder, prepare_upload, model.prepare, model.img_size, up, max_pixels
        )
        admission.since_trim += len(up.data) + 4 * result[3]  # decoded RGBA, roughly
        up.data = b""  # the bytes are no longer needed: free them before the next image
        return result

    @app.post("/predict", openapi_extra=_request_body_docs())
    async def predict(
        request: Request,
        top_k: int = Query(settings.top_k, ge=1, le=1000, description="classes per image"),
    ) -> dict[str, Any]:
        started = time.perf_counter()
        with admission.request() as take:
            uploads = await read_uploads(request, settings, take)
            decoded = [await prepare(up) for up in uploads]
        inputs = [x for x, *_ in decoded if x is not None]
        if not inputs:
            status, reason = decoded[0][1], decoded[0][2]
            raise HTTPException(
                status, reason if len(decoded) == 1 else f"No usable image: {reason}"
            )
        t_decoded = time.perf_counter()
        probs = await batcher.submit(inputs)
        t_done = time.perf_counter()
        return {
            "predictions": _answers(model, uploads, decoded, probs, top_k),
            "timing_ms": {
                "decode": round(1000 * (t_decoded - started), 2),
                "inference": round(1000 * (t_done - t_decoded), 2),
                "total": round(1000 * (time.perf_counter() - started), 2),
            },
        }


def _recorded_paths(folder: Path) -> set[str]:
    """Every absolute path the run's JSON files record (data root, unseen and evaluation
    folders...), and the run folder's own."""
    found = {str(folder.resolve()), str(folder.absolute()), str(Path.home())}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and len(value) < 4096:
            if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute():
                found.add(value)

    for path in [*folder.glob("*.json"), *folder.glob("eval-*/*.json")]:
        try:
            walk(json.loads(path.read_text(errors="replace")))
        except (OSError, ValueError, RecursionError):
            continue
    return {p for p in found if len(p) > 1}


#: an absolute path left in text (after a space, '>' or '('), as a safety net: its folders
_ABSOLUTE = re.compile(r"(?<=[\s>(])(?:/[^\s<>\"'/]+)+/(?=[^\s<>\"'/])")


def redact_report(text: str, folder: Path) -> str:
    """The report as served: each absolute local path shown by its last folder name only,
    so a client learns nothing of this machine's layout (the file itself is unchanged)."""
    for path in sorted(_recorded_paths(folder), key=len, reverse=True):
        pure = PureWindowsPath(path) if "\\" in path else PurePosixPath(path)
        short = "~" if path == str(Path.home()) else pure.name or "/"
        for form in {path, html.escape(path), html.escape(path, quote=False)}:
            text = text.replace(form, short)
    return _ABSOLUTE.sub("", text)


def _add_static_routes(app: FastAPI, model: ServedModel, settings: ServeSettings) -> None:
    """GET /, /health, /model, /report and /docs: the page, liveness, the model, its report
    and the API documentation, all from this server (nothing loads from the internet)."""
    page = (Path(__file__).parent / "web" / "index.html").read_text()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url="/static/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui.css",
            swagger_favicon_url="/static/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # it would call validator.swagger.io
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "classes": len(model.classes)}

    @app.get("/model")
    async def describe() -> dict[str, Any]:
        return model.describe(settings)

    @app.get("/report", response_class=HTMLResponse)
    async def report() -> HTMLResponse:
        if model.report is None:
            raise HTTPException(404, "This model has no report.html (run `graft report RUN`).")
        path = model.report
        text = await asyncio.to_thread(lambda: path.read_text(errors="replace"))
        return HTMLResponse(await asyncio.to_thread(redact_report, text, model.folder))


def create_app(
    source: str | Path, settings: ServeSettings | None = None, unknown: bool = True
) -> FastAPI:
    """The FastAPI application serving ``source`` (a run folder or an export folder);
    ``unknown=False`` answers every image with its top class."""
    settings = settings or ServeSettings()
    source = Path(source)
    if not source.exists():
        raise RunFolderError(f"{source} does not exist: give a run folder or an export folder.")
    model = ServedModel(source, unknown)
    model.warm_up(settings.max_batch)
    batcher = Batcher(model.infer, settings.max_batch)

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
        docs_url=None,  # served below from graft/static instead of a CDN
        redoc_url=None,  # ReDoc only exists on a CDN
    )
    app.state.model, app.state.settings = model, settings
    _add_static_routes(app, model, settings)
    _add_predict_route(app, model, settings, batcher)
    return app


# ----------------------------------------------------------------------------- the server


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or a GraftError saying why not. Bound here, not by
    uvicorn, which logs a bind failure and calls sys.exit(1)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"--port must be a whole number from 1 to 65535, got {port!r}.")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(
            f"--host {host!r} is not an address of this machine ({exc}): use 127.0.0.1, "
            "0.0.0.0 or a name that resolves."
        ) from exc
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":
            # as uvicorn does: a restart may reuse a port in TIME_WAIT, never a listening one
            # (on Windows the same option would let it take a port another server listens on)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        where = f"port {port} on {host}"
        if exc.errno == errno.EADDRINUSE:
            message = f"{where} is in use: choose another --port or stop the other server."
        elif exc.errno in (errno.EACCES, errno.EPERM):
            message = f"{where} needs privileges: choose a --port above 1023."
        else:
            message = os_error_message(exc, f"listen on {where}") or f"{where}: {exc}."
        raise SystemResourceError(message) from exc
    return sock


def _h11_with_header_deadline(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not
    all in ``seconds`` after it opened or after its last response, or that still sends a
    body ``seconds`` after it was answered. uvicorn (0.54) has no such timeout: a client
    sending a header byte now and then held a connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            waiting = self.conn.their_state is h11.IDLE  # still no complete request
            # or still sending a body the server already answered (413, 503): drop it
            draining = self.conn.their_state is h11.SEND_BODY and self.conn.our_state in (
                h11.DONE,
                h11.MUST_CLOSE,
            )
            if (waiting or draining) and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def build_server(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
    unknown: bool = True,
) -> tuple[Any, socket.socket]:
    """A uvicorn server for ``source`` and the socket it will listen on (bound here first,
    before the model loads, so a taken port fails fast): ``server.run(sockets=[sock])``."""
    import uvicorn

    settings = settings or ServeSettings()
    sock = _listening_socket(host, port)
    try:
        config = uvicorn.Config(
            create_app(source, settings, unknown),
            log_level=log_level,
            http=_h11_with_header_deadline(settings.header_timeout_s),
            limit_concurrency=settings.max_connections,
            timeout_keep_alive=max(1, math.ceil(settings.keep_alive_s)),
            h11_max_incomplete_event_size=16 * 1024,  # request line and headers
        )
    except BaseException:
        sock.close()
        raise
    return uvicorn.Server(config), sock


def serve(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
    unknown: bool = True,
) -> None:
    """Serve until interrupted (uvicorn, one process: the model loads once)."""
    server, sock = build_server(source, host, port, settings, log_level, unknown)
    with sock:
        server.run(sockets=[sock])


__all__ = [
    "MB",
    "Admission",
    "Batcher",
    "ServeSettings",
    "ServedModel",
    "build_server",
    "create_app",
    "redact_report",
    "serve",
]
