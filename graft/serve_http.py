"""The network side of ``graft serve``, below the app: the listening socket, uvicorn's HTTP
protocol with graft's deadlines and connection limit, and a uvicorn server that stops
gracefully.

    listening_socket  bind host:port, or a GraftError saying why not
    is_loopback       whether a bound socket is reachable only from this machine
    h11_protocol      uvicorn's h11 protocol: header deadline, connection cap with Retry-After
    GraftServer       SIGTERM: /readyz turns 503, no new connections, requests in progress
                      finish within the grace period, then ``run`` returns (exit 0)
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from .errors import SystemResourceError, UsageError, os_error_message
from .serve_ops import METHODS, Health, log, route_of


def listening_socket(host: str, port: int) -> socket.socket:
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


def is_loopback(sock: socket.socket) -> bool:
    """True when ``sock`` is bound to a loopback address (127.0.0.0/8, ::1): only this
    machine can connect. 0.0.0.0, :: and a network interface's address are not."""
    if sock.family == getattr(socket, "AF_UNIX", None):
        return True
    try:
        address = ipaddress.ip_address(sock.getsockname()[0].split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _busy_app(limit: int, record: Callable[..., None]) -> Any:
    """An ASGI app answering 503 with Retry-After (uvicorn's own concurrency limit answers
    without one) and closing the connection; ``record`` counts and logs it."""
    body = json.dumps(
        {"detail": f"The server has {limit} connections open, its limit: retry in 1 s."}
    ).encode()

    async def busy(scope: Any, receive: Any, send: Any) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        client = scope.get("client")
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        record(method, route_of(scope["path"]), 503, 0.0, 0, client[0] if client else None)

    return busy


def h11_protocol(
    header_timeout_s: float,
    max_connections: int,
    early: Callable[[bytes, Any], tuple[bytes, int] | None] = lambda data, client: None,
    record: Callable[..., None] = lambda *request: None,
) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not
    all in ``header_timeout_s`` after it opened or after its last response, or that still
    sends a body that long after it was answered (uvicorn 0.54 has no such timeout: a client
    sending a header byte now and then held a connection forever). A request arriving while
    more than ``max_connections`` are open, or as many requests are running, is answered 503
    with Retry-After (uvicorn's ``limit_concurrency`` answers without it; it is left off).
    ``early(data, client)`` sees the first bytes of each request before they are parsed
    and may answer it at once (graft.serve_ops.early_refusal): the request's bytes are then
    skipped and the connection kept for the next one. ``record(method, route, status,
    seconds, images, client)`` counts and logs the connection cap's refusals."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _busy_app(max_connections, record)

    class GraftH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _skip = 0  # bytes left of a request answered early, dropped as they come

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._app = self.app
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._skip:
                dropped = min(self._skip, len(data))
                self._skip, data = self._skip - dropped, data[dropped:]
                if not data:
                    return
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                answer = early(data, self.client[0] if self.client else None)
                if answer is not None:
                    response, length = answer
                    self._unset_keepalive_if_required()
                    self.transport.write(response)
                    self._skip = max(0, length - len(data))
                    self._arm()  # a body that stops coming is closed like idle headers
                    if len(data) > length:
                        self.data_received(data[length:])  # the next request, pipelined
                    return
            # read by uvicorn when this data completes a request's headers
            over = len(self.connections) > max_connections or len(self.tasks) >= max_connections
            self.app = busy if over else self._app
            super().data_received(data)

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
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            waiting = self.conn.their_state is h11.IDLE  # still no complete request
            # or still sending a body the server already answered (413, 503): drop it
            draining = self.conn.their_state is h11.SEND_BODY and self.conn.our_state in (
                h11.DONE,
                h11.MUST_CLOSE,
            )
            if (waiting or draining) and not self.transport.is_closing():
                self.transport.close()

    return GraftH11


def graft_server(config: Any, health: Health, grace_s: float) -> Any:
    """A uvicorn server that stops gracefully: see :class:`GraftServer` (built here so that
    uvicorn is imported only when a server is)."""
    import uvicorn

    class GraftServer(uvicorn.Server):
        """On SIGTERM (or ``should_exit``): readiness turns false first, the listening
        socket closes, idle connections close, requests in progress are answered within
        ``grace_s`` (then cut), and ``run`` returns normally, so ``graft serve`` exits 0:
        a requested stop is not a failure. Ctrl+C (SIGINT) still ends as an interruption."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM and not self.should_exit:
                self.should_exit = True  # not recorded: uvicorn would raise it again at the end
                return
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            health.stopping.set()
            running = len(self.server_state.tasks)
            log.info(
                "Stopping: no new connections; %d request%s in progress get up to %g s to "
                "finish; /readyz answers 503.",
                running,
                "" if running == 1 else "s",
                grace_s,
            )
            await super().shutdown(sockets)

    config.timeout_graceful_shutdown = grace_s
    return GraftServer(config)


__all__ = ["graft_server", "h11_protocol", "is_loopback", "listening_socket"]
