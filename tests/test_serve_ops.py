"""`graft serve` on a real network (issue 18): API keys, /metrics, /livez and /readyz, load
shedding with a deadline, graceful shutdown on SIGTERM, one structured log line per request.

The model is an ONNX export of the session's trained run: it loads in a fraction of a second,
so each test starts its own app or server."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import draw_shape
from graft.cli import main
from graft.errors import UsageError
from graft.export import export_run
from graft.serve import ServeSettings, build_server, configure_logging, create_app, load_api_keys

KEY = "graft-test-key-0123456789"
OTHER = "graft-test-key-9876543210"
AUTH = {"Authorization": f"Bearer {KEY}"}


def png(shape: str = "circle", seed: int = 1) -> bytes:
    buf = io.BytesIO()
    draw_shape(shape, random.Random(seed), 64).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(trained_run, "onnx", tmp_path_factory.mktemp("ops") / "exp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics answer, parsed by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ----------------------------------------------------------------------------- API keys


@pytest.fixture(scope="module")
def locked(exported: Path) -> Iterator[TestClient]:
    app = create_app(exported, ServeSettings(max_files=4), api_keys=[KEY, OTHER])
    with TestClient(app) as c:
        yield c


def _send(client: TestClient, form: str, headers: dict[str, str]) -> httpx.Response:
    if form == "json":
        body = {"images": [base64.b64encode(png()).decode()]}
        return client.post("/predict", json=body, headers=headers)
    return client.post("/predict", files=[("file", ("a.png", png()))], headers=headers)


@pytest.mark.parametrize("form", ["json", "multipart"])
@pytest.mark.parametrize(
    "headers, words",
    [
        ({}, "requires an API key"),
        ({"Authorization": "Bearer graft-test-key-0123456780"}, "not valid"),
        ({"Authorization": f"Basic {KEY}"}, "must read 'Bearer KEY'"),
        ({"Authorization": "Bearer "}, "must read 'Bearer KEY'"),
    ],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
def test_predict_without_a_right_key_is_401(
    locked: TestClient, form: str, headers: dict[str, str], words: str
) -> None:
    r = _send(locked, form, headers)
    assert r.status_code == 401, r.text
    assert words in r.json()["detail"] and r.headers["www-authenticate"].startswith("Bearer")
    assert KEY not in r.text


@pytest.mark.parametrize("form", ["json", "multipart"])
@pytest.mark.parametrize("key", [KEY, OTHER])
def test_predict_with_an_accepted_key_is_200(locked: TestClient, form: str, key: str) -> None:
    r = _send(locked, form, {"Authorization": f"bearer {key}"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top"][0]["class"] in ("circle", "square", "triangle")


def test_probes_page_and_docs_need_no_key_the_data_does(locked: TestClient) -> None:
    for path in ("/livez", "/readyz", "/health", "/", "/docs", "/openapi.json"):
        assert locked.get(path).status_code == 200, path
    assert locked.get("/static/swagger-ui.css").status_code == 200
    for path in ("/model", "/report", "/metrics", "/no-such-page"):
        assert locked.get(path).status_code == 401, path
        assert locked.get(path, headers=AUTH).status_code in (200, 404), path
    spec = locked.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/predict"]["post"]["security"] == [{"apiKey": []}]
    assert spec["paths"]["/livez"]["get"]["security"] == []
    assert spec["info"]["title"] == "graft"  # the model's name is not given away without a key


def test_keys_from_flags_file_and_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("text")
    keys = tmp_path / "keys"
    keys.write_text(f"# rotated monthly\n{KEY}\n\n  {OTHER}  # the old one\n")
    keys.chmod(0o600)
    env = "graft-env-key-abcdefghijk, graft-env-key-lmnopqrstuv"
    found = load_api_keys([KEY], keys, env)
    assert found == [KEY, OTHER, "graft-env-key-abcdefghijk", "graft-env-key-lmnopqrstuv"]
    assert capsys.readouterr().err == ""
    keys.chmod(0o644)
    assert load_api_keys((), keys) == [KEY, OTHER]
    assert "can be read by other users" in capsys.readouterr().err
    assert load_api_keys((), None, " , ") == []  # an empty variable counts as unset
    assert stat.S_IMODE(keys.stat().st_mode) == 0o644  # only warned about, never changed


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"key_file": "missing.txt"}, "does not exist"),
        ({"key_file": "empty.txt"}, "holds no key"),
        ({"key_file": "."}, "is a folder"),
        ({"keys": ["short-secret"]}, "12 characters long; use at least 16"),
        ({"keys": [""]}, "is empty"),
        ({"keys": ["has a space in the key"]}, "spaces"),
        ({"env": "graft-env-key-abcdefghijk,tiny"}, "GRAFT_API_KEY is 4 characters"),
    ],
)
def test_bad_keys_are_usage_errors_that_never_show_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], words: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(UsageError, match=words) as exc:
        load_api_keys(**kwargs)
    assert "short-secret" not in str(exc.value) and "tiny" not in str(exc.value).split(":")[-1]


def test_a_network_address_without_a_key_is_refused(
    trained_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before the model loads (exit 2), saying how to go on."""
    monkeypatch.delenv("GRAFT_API_KEY", raising=False)
    port = str(_free_port())
    assert main(["serve", str(trained_run), "--host", "0.0.0.0", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "no API key is set" in err and "--api-key-file" in err and "--no-auth" in err
    assert "Serving" not in err
    args = ["serve", str(trained_run), "--port", port, "--no-auth", "--api-key", KEY]
    assert main(args) == 2 and "contradict" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no API key"):
        build_server(trained_run, "0.0.0.0", int(port))


# ----------------------------------------------------------------------------- metrics, log


def test_metrics_count_the_requests_made(exported: Path, capsys: pytest.CaptureFixture) -> None:
    configure_logging("json", "info")
    app = create_app(exported, ServeSettings(max_files=4), api_keys=[KEY])
    with TestClient(app) as c:
        first = _metrics(c.get("/metrics", headers=AUTH).text)
        for i in range(3):
            files = [("file", (f"secret-name-{i}.png", png(seed=i)))] * 2
            assert c.post("/predict", files=files, headers=AUTH).status_code == 200
        bad = c.post("/predict", files=[("file", ("x.png", b"not an image"))], headers=AUTH)
        assert bad.status_code == 415
        assert c.get("/model").status_code == 401
        second = create_app(exported)  # another app in this process: its own registry
        assert _metrics(c.get("/metrics", headers=AUTH).text) != {}
        got = _metrics(c.get("/metrics", headers=AUTH).text)
    assert second.state.metrics.registry is not app.state.metrics.registry

    def count(route: str, method: str, status: str) -> float:
        labels = (("method", method), ("route", route), ("status", status))
        return got.get(("graft_http_requests_total", labels), 0.0)

    assert count("/predict", "POST", "200") == 3 and count("/predict", "POST", "415") == 1
    assert count("/model", "GET", "401") == 1 and count("/metrics", "GET", "200") == 2
    latency = ("graft_http_request_duration_seconds_count", (("route", "/predict"),))
    assert got[latency] == 4
    # each request a model call of 2 images (the warm-up calls the model directly)
    assert got[("graft_model_batch_images_sum", ())] == 3 * 2
    assert got[("graft_queue_images", ())] == 0 and got[("graft_ready", ())] == 1
    assert got[("graft_model_load_seconds", ())] > 0
    assert got[("graft_model_warmup_seconds", ())] > 0
    engine = next(labels for name, labels in got if name == "graft_engine_info")
    assert ("engine", app.state.model.engine) in engine and ("kind", "export (onnx)") in engine
    assert got[("process_resident_memory_bytes", ())] > 10e6
    predicted = (("method", "POST"), ("route", "/predict"), ("status", "200"))
    assert ("graft_http_requests_total", predicted) not in first

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    requests = [line for line in lines if line.get("route") == "/predict"]
    assert [(r["method"], r["status"], r["images"]) for r in requests] == [
        ("POST", 200, 2),
        ("POST", 200, 2),
        ("POST", 200, 2),
        ("POST", 415, 1),
    ]
    assert all(isinstance(r["ms"], float) and r["time"].endswith("Z") for r in requests)
    text = json.dumps(lines)
    assert KEY not in text and "secret-name" not in text and "not an image" not in text


def test_text_log_is_one_line_per_request(exported: Path, capsys: pytest.CaptureFixture) -> None:
    configure_logging("text", "info")
    with TestClient(create_app(exported)) as c:
        c.post("/predict", files=[("file", ("a.png", png()))])
        c.get("/nowhere?token=abc")
    lines = [line for line in capsys.readouterr().err.splitlines() if "images=" in line]
    assert len(lines) == 2
    assert " POST /predict 200 images=1 ms=" in lines[0]
    assert " GET other 404 images=0 ms=" in lines[1] and "token" not in lines[1]


# ----------------------------------------------------------------------------- readiness


def test_ready_only_after_the_warm_up(exported: Path) -> None:
    """/livez answers at once; /readyz is 503 until the warm-up has run; a /predict that
    comes meanwhile waits for it, within its deadline (503 with Retry-After past it)."""
    app = create_app(exported, ServeSettings(timeout_ms=300))
    gate, warm_up = threading.Event(), app.state.model.warm_up
    app.state.model.warm_up = lambda n: gate.wait(30) and warm_up(n)
    with TestClient(app) as c:
        assert c.get("/livez").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "warming up"}
        assert c.get("/health").json() == {"status": "ok", "ready": False, "state": "warming up"}
        started = time.monotonic()
        r = c.post("/predict", files=[("file", ("a.png", png()))])
        assert r.status_code == 503 and "warming up" in r.json()["detail"]
        assert r.headers["retry-after"] == "2" and time.monotonic() - started < 2
        gate.set()
        assert app.state.health.warm.wait(30)
        assert c.get("/readyz").json() == {"status": "ready"}
        assert c.post("/predict", files=[("file", ("a.png", png()))]).status_code == 200


# ----------------------------------------------------------------------------- a live server


class Live:
    """A real uvicorn server from build_server, in a thread, warmed up."""

    def __init__(self, source: Path, settings: ServeSettings, **options: Any):
        self.server, self.sock = build_server(
            source, "127.0.0.1", _free_port(), settings, "warning", **options
        )
        self.app = self.server.config.app
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        assert self.app.state.health.warm.wait(60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def _partial_upload(port: int, data: bytes) -> tuple[socket.socket, bytes]:
    """A /predict whose headers and first half of the body are sent; returns the socket and
    the rest of the body."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    body = head + data + b"\r\n--b--\r\n"
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(
        b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b"
        b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[: len(body) // 2])
    )
    return conn, body[len(body) // 2 :]


def _answer(conn: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = [int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length")]
        if length and len(body) >= length[0]:
            break
    conn.close()
    return int(data.split(b" ", 2)[1]), json.loads(data.partition(b"\r\n\r\n")[2])


def test_readiness_turns_false_when_shutting_down(exported: Path) -> None:
    """A stop (SIGTERM sets the same flag) first turns /readyz to 503, then lets the request
    in progress finish and answers it."""
    live = Live(exported, ServeSettings())
    try:
        conn, rest = _partial_upload(live.port, png())
        assert httpx.get(live.url + "/readyz").status_code == 200
        live.server.should_exit = True
        assert live.app.state.health.stopping.wait(10)
        probe = TestClient(live.app).get("/readyz")  # the same app, while it drains
        assert probe.status_code == 503 and probe.json() == {"status": "shutting down"}
        conn.sendall(rest)
        status, body = _answer(conn)
        assert status == 200 and body["predictions"][0]["label"]
        live.thread.join(30)
        assert not live.thread.is_alive()
    finally:
        live.stop()


class Gated:
    """A live server (with a key) whose model blocks until the test lets it go: at most 2
    images waiting, ``timeout_ms``, 6 connections."""

    def __init__(self, source: Path, timeout_ms: float):
        settings = ServeSettings(max_files=2, max_queue=2, timeout_ms=timeout_ms, max_connections=6)
        self.live = Live(source, settings, api_keys=[KEY])
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), []
        infer = self.live.app.state.model.infer

        def slow(xs: list) -> np.ndarray:
            self.calls.append(len(xs))
            self.entered.set()
            self.release.wait(30)
            return infer(xs)

        self.live.app.state.model.infer = slow

    def post(self, n: int) -> tuple[httpx.Response, float]:
        t = time.monotonic()
        files = [("file", (f"{i}.png", png(seed=i))) for i in range(n)]
        r = httpx.post(self.live.url + "/predict", files=files, headers=AUTH, timeout=10)
        return r, time.monotonic() - t

    def fill(self, pool: ThreadPoolExecutor) -> tuple[Future, Future]:
        """A (1 image) in the model, B (2 images) waiting: the queue is full."""
        a = pool.submit(self.post, 1)
        assert self.entered.wait(10)
        b = pool.submit(self.post, 2)
        while self.live.app.state.shedder.images < 2:  # a condition of the server, polled
            assert not b.done(), b.result()[0].text
            time.sleep(0.005)
        return a, b


@pytest.fixture
def gated(exported: Path) -> Iterator[Callable[[float], Gated]]:
    made: list[Gated] = []

    def make(timeout_ms: float) -> Gated:
        made.append(Gated(exported, timeout_ms))
        return made[-1]

    yield make
    for g in made:
        g.release.set()
        g.live.stop()


def test_overload_is_503_with_retry_after_within_the_deadline(gated) -> None:
    """A fills the model, B the queue; C finds the queue full (503 at once); A and B pass
    their 500 ms deadline (503 then, not later); B's images are never run."""
    g = gated(500)
    with ThreadPoolExecutor(2) as pool:
        a, b = g.fill(pool)
        c, c_s = g.post(1)
        assert c.status_code == 503 and "at capacity" in c.json()["detail"]
        assert int(c.headers["retry-after"]) >= 1 and c_s < 0.4
        for future in (a, b):
            r, seconds = future.result()
            assert r.status_code == 503 and "not answered within 500 ms" in r.json()["detail"]
            assert int(r.headers["retry-after"]) >= 1
            assert 0.45 < seconds < 1.5
    g.release.set()
    r, _ = g.post(1)
    assert r.status_code == 200 and g.calls == [1, 1]  # A, then D: B was dropped unstarted
    shed = _metrics(httpx.get(g.live.url + "/metrics", headers=AUTH).text)
    assert shed[("graft_shed_requests_total", (("reason", "queue_full"),))] == 1
    assert shed[("graft_shed_requests_total", (("reason", "deadline"),))] == 2


def _request(path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{'POST' if body else 'GET'} {path} HTTP/1.1", "Host: t"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines += ["Content-Type: multipart/form-data; boundary=b", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _answers(conn: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` responses read from one keep-alive connection: (status, head)."""
    data, found = b"", []
    while len(found) < count:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {len(found)} answers"
        data += chunk
        while b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(rest) < length:
                break
            found.append((int(head.split(b" ", 2)[1]), head.lower()))
            data = rest[length:]
    return found


def test_a_full_queue_refuses_before_parsing_and_keeps_the_connection(gated) -> None:
    """While the queue is full, a /predict with the key is answered 503 from its first bytes
    (serve_ops.early_refusal), its body skipped: the next requests on the same connection,
    pipelined behind it, are answered as usual. Without the key it is still a 401."""
    g = gated(5000)
    form = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    body = form + png() + b"\r\n--b--\r\n"
    with ThreadPoolExecutor(2) as pool:
        a, b = g.fill(pool)
        conn = socket.create_connection(("127.0.0.1", g.live.port), timeout=10)
        conn.sendall(
            _request("/predict", body, AUTH)
            + _request("/livez")
            + _request("/predict", body)  # no key
            + _request("/predict?top_k=1", body, AUTH)
        )
        got = _answers(conn, 4)
        conn.close()
        assert [status for status, _ in got] == [503, 200, 401, 503]
        assert b"retry-after:" in got[0][1] and b"retry-after:" in got[3][1]
        assert b"server: uvicorn" not in got[0][1]  # answered before uvicorn parsed it
        assert b"server: uvicorn" in got[1][1]
        # without the protocol (headers cut across packets, say), the app refuses the same
        files = [("file", ("a.png", png()))]
        late = TestClient(g.live.app).post("/predict", files=files, headers=AUTH)
        assert late.status_code == 503 and "at capacity" in late.json()["detail"]
        g.release.set()  # the model goes on: A and B are answered within their deadline
        assert [f.result()[0].status_code for f in (a, b)] == [200, 200]
    assert g.calls == [1, 2]


def test_a_request_that_would_wait_past_half_its_deadline_is_refused_at_once() -> None:
    """The queue bound adapts: at the rate measured while saturated (0.1 s an image here),
    10 images waiting are a second of work, over half the 1 s deadline: the next request is
    refused now, with that second as Retry-After, instead of timing out later. An empty
    queue always takes a request, so a stale rate cannot lock the server."""
    from graft.serve_queue import Shedder

    shedder = Shedder(max_images=128, timeout_s=1.0)
    shedder.note_rate(0.4, 4)
    shedder.images = 4
    assert not shedder.is_full(1)  # 0.5 s of work: within half the deadline
    shedder.images = 10
    assert shedder.is_full(1)
    refusal = shedder.full_refusal()
    assert refusal.status_code == 503 and refusal.headers["Retry-After"] == "1"
    assert "about 1.0 s of work" in refusal.detail
    shedder.images = 0
    assert not shedder.is_full(100)  # nothing waiting: admitted, however slow it looked
    assert shedder.is_full(129)  # but never more than max_images


def test_connections_over_the_cap_get_503_with_retry_after(gated) -> None:
    live = gated(500).live
    idle = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(6)]
    try:
        r = httpx.get(live.url + "/livez")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "6 connections open" in r.json()["detail"]
    finally:
        for conn in idle:
            conn.close()


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_answers_the_requests_in_flight_and_exits_0(exported: Path) -> None:
    """A real `graft serve` process: six uploads are half sent, SIGTERM comes, the uploads
    finish; each is answered 200 and the process exits 0, saying it stopped."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRAFT_API_KEY": ""}
    cmd = [sys.executable, "-m", "graft", "serve", str(exported), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--grace-s", "20"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:  # another process: polling /readyz is what an orchestrator does too
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        uploads = [_partial_upload(port, png(seed=i)) for i in range(6)]
        name = "graft_http_requests_in_progress"
        while _metrics(httpx.get(url + "/metrics").text)[(name, ())] < 7:  # 6 + this one
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        seen = []  # the server's lines until it says it is stopping (the uploads wait for it)
        while not seen or "Stopping" not in seen[-1]:
            seen.append(proc.stderr.readline())
            assert seen[-1], "".join(seen)
        answers = []
        for conn, rest in uploads:
            conn.sendall(rest)
            answers.append(_answer(conn))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(seen) + proc.stderr.read()
    assert [status for status, _ in answers] == [200] * 6, err
    assert all(body["predictions"][0]["label"] for _, body in answers)
    assert "Stopping: no new connections; 6 requests in progress" in err, err
    assert err.count(" POST /predict 200 images=1 ") == 6


def test_sigterm_while_the_model_loads_is_a_clean_stop(trained_run: Path) -> None:
    """A supervisor's stop (`systemctl stop`) that comes before the server listens exits 0
    like one that comes later, not 130 (which systemd counts as a failure); Ctrl+C there
    is still an interruption. (In a process of its own: the signal goes to it alone.)"""
    driver = (
        "import os, signal, sys, time\n"
        "import graft.serve\n"
        "from graft.cli import main\n"
        "def build_server(*args, **kwargs):\n"
        "    os.kill(os.getpid(), getattr(signal, sys.argv[2]))\n"
        "    time.sleep(5)\n"
        "graft.serve.build_server = build_server\n"
        "sys.exit(main(['serve', sys.argv[1], '--port', '8123']))\n"
    )
    for name, code, said in (
        ("SIGTERM", 0, "stopped (SIGTERM) before it began serving"),
        ("SIGINT", 130, "graft serve: interrupted."),
    ):
        done = subprocess.run(
            [sys.executable, "-c", driver, str(trained_run), name],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == code, done.stderr
        assert said in done.stderr
