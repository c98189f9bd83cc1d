"""What ``graft serve`` needs on a real network, apart from the model: API keys, health
(``/livez``, ``/readyz``), Prometheus metrics and one log line per request.

    load_api_keys      --api-key, --api-key-file and GRAFT_API_KEY -> the accepted keys
    ApiKeys            checks an Authorization header in constant time
    Health             warming up -> ready -> shutting down (what /readyz reports)
    ServeMetrics       the server's metrics, in a registry of its own (one per app)
    Gate               ASGI middleware around the app: the key check, the request count and
                       latency, and the access log line
    early_refusal      the 503 for a /predict while the queue is full, before HTTP parsing
    configure_logging  text or JSON lines on stderr, for uvicorn's messages and graft's own

Which routes need the key (``PUBLIC`` lists the others): everything but liveness and
readiness (a probe has no key), and the web page with its assets and the API documentation
page (a browser must load them to ask for the key). /predict, /model, /report and /metrics
need it, and so does any path graft does not serve (a 401 says nothing about what exists).

Nothing here imports the app or the model; logs never hold a key, an image or a client's
file name: the route (never the raw path or query), the status, the image count, the time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

from .errors import UsageError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Send], Awaitable[None]]

#: shortest key accepted: 16 random characters are out of reach of guessing over a network
MIN_KEY_LENGTH = 16
_NEW_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"

#: the routes graft serves, as metric and log labels (anything else is "other": a client
#: cannot add label values, so the metrics stay bounded whatever paths it sends)
ROUTES = (
    "/",
    "/predict",
    "/model",
    "/report",
    "/docs",
    "/openapi.json",
    "/livez",
    "/readyz",
    "/health",
    "/metrics",
)
#: routes answered without a key (see the module docstring)
PUBLIC = frozenset({"/", "/docs", "/openapi.json", "/static", "/livez", "/readyz", "/health"})

log = logging.getLogger("graft.serve")
access_log = logging.getLogger("graft.access")


def route_of(path: str) -> str:
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


# ----------------------------------------------------------------------------- API keys


def _check_key(key: str, where: str) -> str:
    """``key`` as given, or a UsageError naming where it came from (never the key itself)."""
    if not key:
        raise UsageError(f"{where} is empty: give a key of at least {MIN_KEY_LENGTH} characters.")
    if any(not 0x21 <= ord(c) <= 0x7E for c in key):
        raise UsageError(
            f"{where} has spaces or characters outside printable ASCII, which an HTTP header "
            f"cannot carry: make one with {_NEW_KEY}."
        )
    if len(key) < MIN_KEY_LENGTH:
        raise UsageError(
            f"{where} is {len(key)} characters long; use at least {MIN_KEY_LENGTH} (a short "
            f"key can be guessed over the network): make one with {_NEW_KEY}."
        )
    return key


def _read_key_file(path: Path) -> list[tuple[str, str]]:
    where = f"--api-key-file {path}"
    try:
        if path.is_dir():
            raise UsageError(f"{where} is a folder: give a file with one key per line.")
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{where} does not exist: give a file with one key per line.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where} cannot be read ({exc}): check its permissions.") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        # a warning, not a refusal: container and Kubernetes secrets are often mounted 0644
        log.warning(
            "%s can be read by other users of this machine: `chmod 600 %s` keeps the keys "
            "to the server's user.",
            where,
            path,
        )
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.split("#", 1)[0].strip()
        if key:
            found.append((key, f"{where}, line {number},"))
    if not found:
        raise UsageError(
            f"{where} holds no key (blank lines and # comments are skipped): write one key "
            f"per line, e.g. made with {_NEW_KEY}."
        )
    return found


def load_api_keys(
    keys: Sequence[str] = (), key_file: str | Path | None = None, env: str | None = None
) -> list[str]:
    """Every key from ``--api-key`` (``keys``), ``--api-key-file`` (one key per line, ``#``
    comments) and ``GRAFT_API_KEY`` (``env``, comma-separated), all accepted, in that order
    without repeats. An empty ``env`` counts as unset; anything else wrong is a UsageError."""
    found = [(k, "--api-key") for k in keys]
    if key_file is not None:
        found += _read_key_file(Path(key_file).expanduser())
    if env and env.strip(", "):
        found += [(k.strip(), "GRAFT_API_KEY") for k in env.split(",") if k.strip()]
    return list(dict.fromkeys(_check_key(k, where) for k, where in found))


class ApiKeys:
    """The accepted keys, kept as SHA-256 digests: a header is hashed and compared with every
    digest by ``hmac.compare_digest``, so the time taken says nothing about how much of a key
    was right, nor which key it was."""

    def __init__(self, keys: Sequence[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def refusal(self, authorization: bytes | None) -> str | None:
        """None when ``authorization`` (the header's value) carries an accepted key, else the
        sentence a 401 answers with."""
        if not authorization:
            return (
                "This server requires an API key: send the header 'Authorization: Bearer KEY' "
                "(the web page asks for it)."
            )
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "The Authorization header must read 'Bearer KEY'."
        digest = hashlib.sha256(token.strip()).digest()
        accepted = False
        for known in self._digests:  # every one, whatever matched
            accepted |= hmac.compare_digest(digest, known)
        return None if accepted else "The API key is not valid: check it with the server's owner."


# ----------------------------------------------------------------------------- health


class Health:
    """Liveness is the process answering; readiness is the model loaded and warmed up and
    the server not shutting down (a load balancer sends traffic only then)."""

    def __init__(self) -> None:
        self.warm = threading.Event()  #: set once the warm-up has run (threads can wait on it)
        self.stopping = threading.Event()  #: set when shutdown begins
        self.failure: str | None = None  #: why the warm-up failed, if it did

    @property
    def ready(self) -> bool:
        return self.warm.is_set() and not self.stopping.is_set() and self.failure is None

    @property
    def state(self) -> str:
        if self.stopping.is_set():
            return "shutting down"
        if self.failure is not None:
            return "warm-up failed"
        return "ready" if self.warm.is_set() else "warming up"


# ----------------------------------------------------------------------------- metrics


class ServeMetrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process,
    as in tests, never collide). ``queue`` and ``ready`` are read when scraped."""

    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # resident memory, CPU seconds, open files
        self.requests = Counter(
            "graft_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "graft_http_request_duration_seconds",
            "Time from a request's arrival to its answer",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.in_progress = Gauge(
            "graft_http_requests_in_progress", "Requests being answered", registry=r
        )
        sizes = [1 << i for i in range(max(1, max_batch).bit_length() + 1)]
        self.batch = Histogram(
            "graft_model_batch_images",
            "Images per model call",
            buckets=[s for s in sizes if s <= max_batch] + [max_batch],
            registry=r,
        )
        self.model_seconds = Histogram(
            "graft_model_call_seconds",
            "Time of one model call (a batch)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.queue = Gauge(
            "graft_queue_images", "Images admitted and not yet in a model call", registry=r
        )
        self.shed = Counter(
            "graft_shed_requests",
            "Requests answered 503 to keep the others within their deadline, by reason",
            ["reason"],
            registry=r,
        )
        self.load_seconds = Gauge("graft_model_load_seconds", "Time to load the model", registry=r)
        self.warmup_seconds = Gauge(
            "graft_model_warmup_seconds",
            "Time to warm the engine up (compile each batch shape, run a first image)",
            registry=r,
        )
        self.ready = Gauge("graft_ready", "1 when /readyz answers 200", registry=r)
        self.engine = Info("graft_engine", "The model and the engine that runs it", registry=r)

    def record(
        self, method: str, route: str, status: int, seconds: float, images: int, client: Any
    ) -> None:
        """One request answered: its count, its latency and its access log line."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            fields = {"method": method, "route": route, "status": status, "images": images}
            fields.update(ms=round(1000 * seconds, 1), client=client)
            access_log.info("request", extra={"fields": fields})


# ----------------------------------------------------------------------------- the gate


async def _send_json(
    send: Callable[[Message], Awaitable[None]],
    status: int,
    body: dict[str, Any],
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class Gate:
    """ASGI middleware in front of every route: refuses a request without an accepted key
    (401, before its body is read) unless its route is public, and records each request:
    the count by route, method and status, the latency, and one access log line. A route
    handler reports how many images a request carried in ``scope["graft.images"]``."""

    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        metrics: ServeMetrics,
        full: Callable[[], Any] = lambda: None,
    ):
        self.app, self.keys, self.metrics = app, keys, metrics
        # full(): None, or the 503 (an HTTPException) a /predict gets now. Refused here,
        # before routing, parsing and the body: under overload, refusing must cost far less
        # than serving, or the refusals themselves take the cores the model needs
        self.full = full

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, route, status = time.perf_counter(), route_of(scope["path"]), 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            refusal = None
            if self.keys and route not in PUBLIC:
                refusal = self.keys.refusal(dict(scope["headers"]).get(b"authorization"))
            busy = self.full() if refusal is None and route == "/predict" else None
            if refusal is not None:
                challenge = (b"www-authenticate", b'Bearer realm="graft"')
                await _send_json(watch, 401, {"detail": refusal}, [challenge])
            elif busy is not None:
                headers = [(k.lower().encode(), v.encode()) for k, v in busy.headers.items()]
                await _send_json(watch, busy.status_code, {"detail": busy.detail}, headers)
            else:
                await self.app(scope, receive, watch)
        finally:
            self.metrics.in_progress.dec()
            client = scope.get("client")
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.record(
                method,
                route,
                status,
                time.perf_counter() - started,
                scope.get("graft.images", 0),
                client[0] if client else None,
            )


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def early_refusal(
    keys: ApiKeys,
    metrics: ServeMetrics,
    is_full: Callable[[], bool],
    refusal: Callable[[], Any],
) -> Callable[[bytes, Any], tuple[bytes, int] | None]:
    """``refuse(data, client)``: for the first bytes of a request on a connection, when it is
    a POST /predict (with an accepted key, if keys are on) arriving while the queue is full
    (``is_full()``; ``refusal()`` makes the HTTPException): the whole 503 response and the
    request's length in bytes (headers and body, which the connection then skips). None for
    anything else, or when unsure (headers not all in, no Content-Length, chunked, HTTP/1.0,
    ``Expect`` or ``Connection: close``): uvicorn and the app answer those as usual.

    The HTTP protocol calls it before parsing anything (graft.serve_http): a refusal then
    costs some microseconds, not the millisecond of a request through uvicorn and Starlette.
    On 2 cores at 4x capacity, that millisecond for each refused request was more than the
    cores had: the backlog grew and every answer, 503s too, came seconds late."""
    prefixes = (b"POST /predict ", b"POST /predict?")

    def refuse(data: bytes, client: Any) -> tuple[bytes, int] | None:
        if not data.startswith(prefixes) or not is_full():
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = data[:end].split(b"\r\n")
        if not lines[0].endswith(b" HTTP/1.1"):
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get(b"content-length", b"")
        if (
            not length.isdigit()
            or b"transfer-encoding" in headers
            or b"expect" in headers
            or headers.get(b"connection", b"").lower() == b"close"
        ):
            return None
        if keys and keys.refusal(headers.get(b"authorization")) is not None:
            return None  # the usual path answers 401
        busy = refusal()
        body = json.dumps({"detail": busy.detail}).encode()
        head = [
            b"HTTP/1.1 503 Service Unavailable",
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"retry-after: " + busy.headers["Retry-After"].encode(),
        ]
        metrics.record("POST", "/predict", 503, 0.0, 0, client)
        return b"\r\n".join(head) + b"\r\n\r\n" + body, end + 4 + int(length)

    return refuse


# ----------------------------------------------------------------------------- logging


class LineFormatter(logging.Formatter):
    """One line per record: ``json`` (an object with time, level, message and, for a
    request, its fields) or ``text`` (the same, space-separated)."""

    def __init__(self, fmt: str = "text"):
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        fields: dict[str, Any] = getattr(record, "fields", {})
        if self.json:
            line = {
                "time": stamp,
                "level": record.levelname.lower(),
                "message": record.getMessage(),
            }
            line.update(fields)
            if record.exc_info:
                line["exception"] = self.formatException(record.exc_info)
            return json.dumps(line, default=str)
        if fields:  # an access line
            f = fields
            text = (
                f"{stamp} {f['client'] or '-'} {f['method']} {f['route']} {f['status']} "
                f"images={f['images']} ms={f['ms']}"
            )
        else:
            text = f"{stamp} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (a test's capture
    replaces it; a handler holding the old one would write to a closed file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """uvicorn's messages, graft's serve messages and the access lines, all on stderr in one
    format (``text`` or ``json``); the access lines only at ``level`` info or below. Only
    these loggers are touched (logging.config.dictConfig would close every other handler
    of the process)."""
    if fmt not in ("text", "json"):
        raise UsageError(f"--log-format must be 'text' or 'json', got {fmt!r}.")
    upper = {"trace": "DEBUG"}.get(level.lower(), level.upper())
    handler = _Stderr()
    handler.set_name("graft-serve")
    handler.setFormatter(LineFormatter(fmt))
    for name in ("uvicorn", "graft.serve", "graft.access"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if name == "uvicorn" or old.get_name() == "graft-serve":  # uvicorn's own, or ours
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(upper)
        logger.propagate = False
    for name in ("uvicorn.error", "uvicorn.asgi"):  # through "uvicorn"'s handler
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [], True
        logger.setLevel(upper)
    logging.getLogger("uvicorn.access").propagate = False  # Gate logs each request instead


__all__ = [
    "METHODS",
    "MIN_KEY_LENGTH",
    "PUBLIC",
    "ROUTES",
    "ApiKeys",
    "Gate",
    "Health",
    "LineFormatter",
    "ServeMetrics",
    "configure_logging",
    "early_refusal",
    "load_api_keys",
    "route_of",
]
