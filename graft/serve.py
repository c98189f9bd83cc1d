"""``graft serve``: a trained run (or an export folder) as an HTTP API with a web page.

    POST /predict   images as multipart field ``file`` (repeat it for several) or JSON
                    ``{"images": ["<base64>", ...]}`` -> top-k classes, "unknown", timings
    GET  /livez     liveness: the process answers
    GET  /readyz    readiness: 200 once the model is loaded and warmed up, 503 before and
                    while shutting down (``/health``: the older name, always 200, says which)
    GET  /metrics   Prometheus metrics (requests, latency, batch sizes, queue, load times)
    GET  /model     classes, backbone, input size, metrics, limits
    GET  /          a page to drop images on and see probability bars
    GET  /report    the run's HTML report, when it has one (local paths redacted)
    GET  /docs      OpenAPI documentation (Swagger UI served from graft/static: works offline)

With API keys (``api_keys``; ``graft serve --api-key``), every route needs ``Authorization:
Bearer KEY`` but /livez, /readyz, /health, the page at / with /static, and /docs with
/openapi.json (a probe has no key; a browser must load the page to ask for one). /predict,
/model, /report and /metrics need it (graft.serve_ops). Without a key the server listens
only on a loopback address unless told ``no_auth``.

The model loads once, before the server listens; it then warms up (each batch shape
compiled, a first image run) while /livez already answers. Each image is decoded and turned
into the model's input on one decoding thread (so one big picture, not sixteen, is ever held
at full size), and the inputs waiting for the model are batched (never delayed for it:
whatever queued during the previous batch goes next). Images waiting are bounded and each
request has a deadline: past either, 503 with Retry-After (graft.serve_queue).

This module owns the model behind the API (:class:`ServedModel`), the routes and the app;
reading and admitting requests, and the limits (:class:`ServeSettings`), live in
graft.serve_requests; the socket, protocol and graceful stop in graft.serve_http. What a
client can make the server hold is bounded there. No route takes a path: nothing a client
sends reads or writes a file.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from . import __version__
from .errors import RunFolderError, UsageError
from .rundir import REPORT, SUMMARY, RunDir
from .runtime import (
    METADATA_FILE,
    NON_FINITE,
    ExportError,
    rank_classes,
    split_output,
    unknown_reason,
)
from .serve_docs import redact_report, request_body_docs, secure_docs
from .serve_http import graft_server, h11_protocol, is_loopback, listening_socket
from .serve_ops import (
    ApiKeys,
    Gate,
    Health,
    ServeMetrics,
    configure_logging,
    early_refusal,
    load_api_keys,
    log,
)
from .serve_queue import Batcher, Shedder, Ticket
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
        self.precision, self.int8 = "fp32", None
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
            # an INT8 export: its agreement with fp32 on the held-out split (graft.quantize)
            self.precision = str(exported.meta.get("precision", "fp32"))
            self.int8 = exported.meta.get("int8")
            self.prepare = lambda raw: preprocess([exported.decode(raw)], exported.preprocessing)[0]
            # what ExportedModel.predict_proba_images does after its own preprocess
            self.infer = lambda xs: np.asarray(exported._run(np.stack(xs)), dtype=np.float32)
            self.folder = self.source
        else:
            from .fast import ExportPredictor, open_predictor
            from .modelinfo import resolve_model_file

            # the run's current ONNX export without torch when it has one (graft.fast);
            # n_images=None: a server, so the engine that runs fastest (OpenVINO)
            predictor = open_predictor(self.source)  # tta=False: one view per image
            info = predictor.info  # type: ignore[attr-defined]
            self.kind, self.engine = "run", predictor.runner.name  # type: ignore[attr-defined]
            self.classes, self.img_size = list(info.classes), info.img_size
            self.unknown_threshold = info.unknown_threshold
            self.has_familiarity = predictor.has_familiarity
            self.familiarity_threshold = info.familiarity_threshold
            self.backbone = info.backbone
            self.folder = resolve_model_file(self.source).parent
            data = RunDir(self.folder).read_optional(SUMMARY) or {}
            self.metrics = {k: data[k] for k in ("test", "open_set", "calibration") if k in data}
            if isinstance(predictor, ExportPredictor):
                engine = predictor.engine
                self.prepare = predictor.prepare
                self.infer = lambda xs: engine.run(np.stack(xs))
                self.warm_up = engine.warm_up
            else:  # a stale export (rebuilt now) or GRAFT_ENGINE=torch: the PyTorch path
                import torch

                from .runtime import load_image

                torch_predictor = predictor
                self.prepare = lambda raw: torch_predictor.transform(  # type: ignore[attr-defined]
                    load_image(raw, info.img_size)
                )
                self.infer = lambda xs: torch_predictor.runner(torch.stack(xs)).numpy()  # type: ignore[attr-defined]
                self.warm_up = torch_predictor.runner.warm_up  # type: ignore[attr-defined]
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
            "precision": self.precision,
            **({"int8": self.int8} if self.int8 else {}),
            "report": "/report" if self.report else None,
            "limits": asdict(settings),
            "graft_version": __version__,
        }


# ----------------------------------------------------------------------------- the app


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


def _add_predict_route(app: FastAPI, model: ServedModel, settings: ServeSettings) -> None:
    """POST /predict: admit, read, prepare each image in a thread, run the model (batched),
    each step within the request's deadline."""
    shedder: Shedder = app.state.shedder
    admission: Admission = app.state.admission
    batcher: Batcher = app.state.batcher
    max_pixels = settings.max_megapixels * 1e6
    # One decoding thread, server-wide: one picture at full size at a time, and one malloc
    # arena holding its peak (glibc gives each thread its own, each kept at its high-water
    # mark). The model runs in another thread, so both cores stay busy.
    decoder = ThreadPoolExecutor(1, thread_name_prefix="graft-decode")

    async def prepare(up: Upload, deadline: float, ticket: Ticket) -> tuple[Any, int, str, int]:
        work = asyncio.get_running_loop().run_in_executor(
            decoder, prepare_upload, model.prepare, model.img_size, up, max_pixels
        )
        # past the deadline the image is dropped, never decoded, if it has not started
        result = await shedder.within(deadline, work, "waiting to decode its images")
        admission.since_trim += len(up.data) + 4 * result[3]  # decoded RGBA, roughly
        up.data = b""  # the bytes are no longer needed: free them before the next image
        if result[0] is None:
            ticket.release(1)  # this one never reaches the model
        return result

    async def ready(deadline: float) -> None:
        """Wait for the warm-up (a request may come before /readyz says ready)."""
        health: Health = app.state.health
        if not health.warm.is_set() and health.failure is None:
            try:
                async with asyncio.timeout_at(deadline):
                    await app.state.warmed.wait()
            except TimeoutError:
                raise shedder.refuse("warming_up", "The model is still warming up", 2) from None
        if health.failure is not None:
            reason = "The model failed its warm-up (see the server's log)"
            raise shedder.refuse("warm_up_failed", reason, 60)

    @app.post("/predict", openapi_extra=request_body_docs())
    async def predict(
        request: Request,
        top_k: int = Query(settings.top_k, ge=1, le=1000, description="classes per image"),
    ) -> dict[str, Any]:
        started = time.perf_counter()  # (a full queue was refused by serve_ops.Gate)
        with ExitStack() as stack:
            with admission.request() as take:
                uploads = await read_uploads(request, settings, take)
                request.scope["graft.images"] = len(uploads)  # for the access log
                deadline = shedder.deadline()
                await ready(deadline)  # before the queue: its drain time is the model's
                ticket = stack.enter_context(shedder.admit(len(uploads)))
                decoded = [await prepare(up, deadline, ticket) for up in uploads]
            inputs = [x for x, *_ in decoded if x is not None]
            if not inputs:
                status, reason = decoded[0][1], decoded[0][2]
                raise HTTPException(
                    status, reason if len(decoded) == 1 else f"No usable image: {reason}"
                )
            t_decoded = time.perf_counter()
            work = batcher.submit(inputs, ticket)
            probs = await shedder.within(deadline, work, "waiting for the model")
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
    """GET /, /livez, /readyz, /health, /metrics, /model, /report and /docs: the page, the
    probes, the metrics, the model, its report and the API documentation, all from this
    server (nothing loads from the internet)."""
    page = (Path(__file__).parent / "web" / "index.html").read_text()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    health: Health = app.state.health
    metrics: ServeMetrics = app.state.metrics

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

    @app.get("/livez")
    async def livez() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        state = health.state
        return JSONResponse({"status": state}, 200 if state == "ready" else 503)

    @app.get("/health")
    async def health_() -> dict[str, Any]:
        return {"status": "ok", "ready": health.ready, "state": health.state}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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


def _warm(model: ServedModel, max_batch: int) -> None:
    """Compile each batch shape, then run one blank image through the model: the first
    call's allocations are made here, not in a client's request."""
    model.warm_up(max_batch)
    buf = io.BytesIO()
    Image.new("RGB", (model.img_size, model.img_size), "white").save(buf, "PNG")
    model.infer([model.prepare(buf.getvalue())])


async def _warm_up(app: FastAPI) -> None:
    model, health, metrics = app.state.model, app.state.health, app.state.metrics
    started = time.perf_counter()
    try:
        await asyncio.to_thread(_warm, model, app.state.settings.max_batch)
    except Exception as exc:  # the server stays up, not ready, and says why
        health.failure = f"{type(exc).__name__}: {exc}"
        log.error("The model failed its warm-up (%s): /readyz stays 503.", health.failure)
    else:
        metrics.warmup_seconds.set(time.perf_counter() - started)
        health.warm.set()
        log.info("Ready: warmed up in %.1f s; /readyz answers 200.", time.perf_counter() - started)
    app.state.warmed.set()


def create_app(
    source: str | Path,
    settings: ServeSettings | None = None,
    unknown: bool = True,
    api_keys: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI application serving ``source`` (a run folder or an export folder);
    ``unknown=False`` answers every image with its top class; with ``api_keys``, requests
    need one of them (see the module docstring). The model loads here; it warms up once
    the app starts (/readyz says when it is done; /predict waits for it)."""
    settings = settings or ServeSettings()
    keys = load_api_keys(api_keys)
    source = Path(source)
    if not source.exists():
        raise RunFolderError(f"{source} does not exist: give a run folder or an export folder.")
    metrics = ServeMetrics(settings.max_batch)
    started = time.perf_counter()
    model = ServedModel(source, unknown)
    metrics.load_seconds.set(time.perf_counter() - started)
    metrics.engine.info(
        {"engine": model.engine, "kind": model.kind, "model": model.name, "graft": __version__}
    )
    health = Health()
    metrics.ready.set_function(lambda: float(health.ready))
    shedder = Shedder(settings.queue_images, settings.timeout_ms / 1000, metrics)
    metrics.queue.set_function(lambda: shedder.images)
    # through model.infer at each call, so a test can slow the model down
    batcher = Batcher(lambda xs: model.infer(xs), settings.max_batch, shedder, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.warmed = asyncio.Event()  # the warm-up ran (or failed)
        batcher.start()
        warming = asyncio.get_running_loop().create_task(_warm_up(app))
        yield
        warming.cancel()
        await batcher.stop()

    app = FastAPI(
        title="graft" if keys else f"graft: {model.name}",  # with a key, /docs is public
        version=__version__,
        description="Image classifier."
        if keys
        else f"Image classifier ({model.backbone}, {len(model.classes)} classes).",
        lifespan=lifespan,
        docs_url=None,  # served below from graft/static instead of a CDN
        redoc_url=None,  # ReDoc only exists on a CDN
    )
    app.state.model, app.state.settings, app.state.health = model, settings, health
    app.state.metrics, app.state.shedder, app.state.batcher = metrics, shedder, batcher
    admission = app.state.admission = Admission(settings, metrics.shed.labels("busy").inc)

    def full() -> bool:  # a /predict arriving now would be refused
        return shedder.is_full() or admission.full()

    def refusal() -> HTTPException:
        return shedder.full_refusal() if shedder.is_full() else admission.busy()

    checker = ApiKeys(keys)
    app.add_middleware(
        Gate, keys=checker, metrics=metrics, full=lambda: refusal() if full() else None
    )
    app.state.early_refusal = early_refusal(checker, metrics, full, refusal)
    _add_static_routes(app, model, settings)
    _add_predict_route(app, model, settings)
    if keys:
        secure_docs(app)
    return app


# ----------------------------------------------------------------------------- the server


def build_server(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
    unknown: bool = True,
    *,
    api_keys: Sequence[str] = (),
    no_auth: bool = False,
    grace_s: float = 20.0,
    log_format: str = "text",
) -> tuple[Any, Any]:
    """A uvicorn server for ``source`` and the socket it will listen on (bound here first,
    before the model loads, so a taken port fails fast): ``server.run(sockets=[sock])``.
    A socket reachable from other machines needs ``api_keys``, or ``no_auth=True`` to accept
    the risk. SIGTERM stops it gracefully: requests in progress get ``grace_s`` seconds."""
    import uvicorn

    settings = settings or ServeSettings()
    keys = load_api_keys(api_keys)
    if keys and no_auth:
        raise UsageError("--no-auth and an API key contradict each other: give one of them.")
    if (
        isinstance(grace_s, bool)
        or not isinstance(grace_s, int | float)
        or not 0 <= grace_s <= 3600
    ):
        raise UsageError(f"--grace-s must be a number of seconds from 0 to 3600, got {grace_s!r}.")
    configure_logging(log_format, log_level)
    sock = listening_socket(host, port)
    try:
        if not keys and not no_auth and not is_loopback(sock):
            raise UsageError(
                f"--host {host} lets other machines reach the API, and no API key is set: "
                "anyone who can connect could use it. Give a key (--api-key-file FILE, the "
                "GRAFT_API_KEY variable or --api-key KEY; clients send 'Authorization: Bearer "
                "KEY'), or pass --no-auth to accept the risk (e.g. behind a proxy that "
                "authenticates)."
            )
        app = create_app(source, settings, unknown, keys)
        config = uvicorn.Config(
            app,
            log_config=None,  # configure_logging did it: one format for every line
            log_level=log_level,
            access_log=False,  # graft.serve_ops.Gate logs each request instead
            http=h11_protocol(
                settings.header_timeout_s,
                settings.max_connections,
                app.state.early_refusal,
                app.state.metrics.record,
            ),
            timeout_keep_alive=max(1, math.ceil(settings.keep_alive_s)),
            timeout_graceful_shutdown=grace_s,
            h11_max_incomplete_event_size=16 * 1024,  # request line and headers
        )
    except BaseException:
        sock.close()
        raise
    return graft_server(config, app.state.health, grace_s), sock


def serve(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
    unknown: bool = True,
    **options: Any,
) -> None:
    """Serve until stopped (uvicorn, one process: the model loads once); ``options`` are
    build_server's (api_keys, no_auth, grace_s, log_format)."""
    server, sock = build_server(source, host, port, settings, log_level, unknown, **options)
    with sock:
        server.run(sockets=[sock])


__all__ = [
    "MB",
    "Admission",
    "Batcher",
    "ServeSettings",
    "ServedModel",
    "build_server",
    "configure_logging",
    "create_app",
    "load_api_keys",
    "redact_report",
    "serve",
]
