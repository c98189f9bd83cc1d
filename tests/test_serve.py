"""`graft serve`: the HTTP API answers like graft's predict, batches concurrent requests, and
meets every bad request with a 4xx and a clear message."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import draw_shape
from graft.cli import main
from graft.errors import SystemResourceError, UsageError
from graft.export import export_run
from graft.predict import Predictor
from graft.serve import Admission, Batcher, ServeSettings, build_server, create_app


def png_bytes(shape: str = "circle", seed: int = 1, size: int = 64) -> bytes:
    buf = io.BytesIO()
    draw_shape(shape, random.Random(seed), size).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(trained_run: Path):
    settings = ServeSettings(max_mb=1, max_files=4, max_megapixels=1.0)
    with TestClient(create_app(trained_run, settings)) as c:
        yield c


def test_predict_matches_graft_predict(client: TestClient, unseen_dir: Path) -> None:
    files = sorted(unseen_dir.rglob("*.*"))[:4]
    r = client.post("/predict", files=[("file", (f.name, f.read_bytes())) for f in files])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["name"] for p in body["predictions"]] == [f.name for f in files]
    expected, _ = Predictor.from_run(client.app.state.model.folder).predict_proba(files)
    classes = client.app.state.model.classes
    for row, pred in zip(expected, body["predictions"], strict=True):
        assert len(pred["top"]) == 3
        for t in pred["top"]:
            assert t["probability"] == pytest.approx(row[classes.index(t["class"])], abs=1e-5)
        assert pred["top"][0]["class"] == classes[int(row.argmax())]
        assert pred["label"] in (*classes, "unknown")
    assert set(body["timing_ms"]) == {"decode", "inference", "total"}


def test_json_base64_and_data_urls(client: TestClient) -> None:
    raw = png_bytes("square")
    b64 = base64.b64encode(raw).decode()
    r1 = client.post("/predict", json={"images": [b64]})
    r2 = client.post(
        "/predict?top_k=1",
        json={"images": [{"name": "sq.png", "data": "data:image/png;base64," + b64}]},
    )
    assert r1.status_code == r2.status_code == 200
    p1, p2 = r1.json()["predictions"][0], r2.json()["predictions"][0]
    assert p2["name"] == "sq.png" and len(p2["top"]) == 1
    assert p1["top"][0] == p2["top"][0]


def test_model_health_docs_page_and_report(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/model").json()
    assert info["classes"] == ["circle", "square", "triangle"]
    assert info["limits"]["max_files"] == 4 and "accuracy" in info["metrics"]["test"]
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text
    assert info["report"] == "/report" and "<html" in client.get("/report").text.lower()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 8000)).save(buf, "PNG")  # 96 Mpx in a few KB
    return buf.getvalue()


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        (
            {"data": {"note": "hi"}, "files": [("other", ("a.txt", b"x"))]},
            400,
            "field named 'file'",
        ),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
        ({"files": [("file", ("x.jpg", b"this is text"))]}, 415, "not an image"),
        ({"files": [("file", ("t.png", png_bytes()[:150]))]}, 422, "x.png"[1:]),
        ({"files": [("file", ("empty.png", b""))]}, 400, "empty"),
        ({"files": [("file", ("big.png", b"\x89PNG" + b"0" * (1024 * 1024)))]}, 413, "limit"),
        ({"files": [("file", ("bomb.png", _bomb()))]}, 413, "too large"),
        ({"files": [("file", (f"{i}.png", png_bytes())) for i in range(5)]}, 413, "limit is 4"),
        ({"json": {"images": ["not base64!!"]}}, 400, "base64"),
        ({"json": {"pictures": []}}, 400, '{"images"'),
        ({"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ],
    ids=[
        "no-file",
        "wrong-type",
        "not-image",
        "corrupt",
        "empty",
        "too-large",
        "bomb",
        "too-many",
        "bad-base64",
        "bad-json-shape",
        "bad-json",
    ],
)
def test_bad_requests_get_clear_4xx(client: TestClient, kwargs: dict, status: int, words: str):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_one_bad_file_among_good_ones_is_reported_not_fatal(client: TestClient) -> None:
    r = client.post(
        "/predict",
        files=[("file", ("good.png", png_bytes())), ("file", ("bad.jpg", b"nope"))],
    )
    assert r.status_code == 200
    good, bad = r.json()["predictions"]
    assert good["label"] and "not an image" in bad["error"]


def test_client_names_never_touch_the_disk(client: TestClient, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = client.post("/predict", files=[("file", ("../../../../tmp/evil.png", png_bytes()))])
    assert r.json()["predictions"][0]["name"] == "evil.png"  # echoed, never opened or written
    assert list(tmp_path.iterdir()) == []
    for path in ("/report/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/report%2f..%2fx"):
        r = client.get(path)
        assert r.status_code == 404 and "root:" not in r.text


def test_requests_are_batched_under_concurrency() -> None:
    sizes: list[int] = []

    def fn(images: list) -> np.ndarray:
        sizes.append(len(images))
        return np.tile(np.arange(len(images), dtype=np.float32)[:, None], (1, 2))

    async def main() -> list[np.ndarray]:
        batcher = Batcher(fn, max_batch=32)
        batcher.start()
        try:
            return await asyncio.gather(*[batcher.submit([i, i]) for i in range(10)])
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert sum(sizes) == 20 and max(sizes) > 2  # several requests ran as one batch
    for r in results:  # each caller gets back exactly its own rows
        assert r.shape == (2, 2) and r[1, 0] == r[0, 0] + 1


def test_serves_an_export_folder(trained_run: Path, tmp_path: Path) -> None:
    out = export_run(trained_run, "onnx", tmp_path / "exp")
    with TestClient(create_app(out)) as c:
        info = c.get("/model").json()
        assert info["kind"] == "export (onnx)" and info["report"] == "/report"
        r = c.post("/predict", files=[("file", ("a.png", png_bytes("triangle", 3)))])
        assert r.status_code == 200 and r.json()["predictions"][0]["top"][0]["class"]


# ----------------------------------------------------------------------------- issue 20, 8-12


@pytest.fixture(scope="module")
def live(trained_run: Path) -> Iterator[tuple[int, ServeSettings]]:
    """A real uvicorn server (graft's protocol, limits and socket) on a free port, with short
    timeouts and small limits so each guard trips in well under a second."""
    settings = ServeSettings(
        max_mb=1, max_files=4, max_requests=1, read_timeout_s=1.0, header_timeout_s=0.5
    )
    server, sock = build_server(trained_run, "127.0.0.1", _free_port(), settings, "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield sock.getsockname()[1], settings
    server.should_exit = True
    thread.join(10)
    sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.settimeout(5)
    return conn


def _response(conn: socket.socket) -> tuple[int, bytes]:
    """Status and raw bytes of the answer (the server closes or sends a complete one)."""
    data = b""
    while b"\r\n\r\n" not in data or (b"content-length" in data.lower() and not _complete(data)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return (int(data.split(b" ", 2)[1]) if data else 0), data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length")
    )  # fmt: skip
    return len(body) >= length


def _png(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "name, data, status",
    [
        ("big.png", _png("1", (9000, 9000)), 413),  # 81 Mpx in ~10 KB: refused from its header
        ("wide.png", _png("L", (2100, 500)), 413),  # just over 1 Mpx
        ("photo.jpg", _png("RGB", (4000, 3000), "JPEG"), 200),  # decodes at 1/8: 0.2 Mpx
    ],
)
def test_pixel_budget_is_checked_before_decoding(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes, status: int
) -> None:
    """Issue 20.8: eight 9000x9000 PNGs took the server to 5.5 GB; the size is now read from
    the header and refused over ``max_megapixels`` (1 here) before a pixel is decoded."""
    model, decoded = client.app.state.model, []
    prepare = model.prepare
    monkeypatch.setattr(model, "prepare", lambda raw: decoded.append(1) or prepare(raw))
    r = client.post("/predict", files=[("file", (name, data))] * 2)
    assert r.status_code == status, r.text
    if status == 413:
        assert "megapixels" in r.json()["detail"] and "limit of 1" in r.json()["detail"]
        assert decoded == []
    else:
        assert len(r.json()["predictions"]) == 2 and len(decoded) == 2


def test_body_over_the_limit_is_refused_while_streaming(live: tuple[int, ServeSettings]) -> None:
    """Issue 20.8: the body was buffered up to max_mb x max_files x 4/3 before any check. Now
    the 413 comes as soon as one file passes max_mb (1 MB here), without waiting for the rest
    of the body; the server then drops the connection if the client keeps it."""
    port, _ = live
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    conn = _connect(port)
    conn.sendall(
        b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 3000000\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n" + head + b"0" * 1_500_000
    )  # 1.5 MB of a declared 3 MB, then nothing more
    status, raw = _response(conn)
    assert status == 413 and b"a.png is over the limit of 1 MB per image" in raw
    assert conn.recv(1024) == b""  # closed after header_timeout_s, not left to the client
    conn.close()


def test_declared_oversized_body_is_refused_before_reading(client: TestClient) -> None:
    """Issue 20.8: the body limit was max_mb x max_files x 4/3 whatever the format (427 MB by
    default). A multipart body is now held to its files' total (4 x 1 MB here) and refused
    from its Content-Length, before a byte is read."""
    body = b"--b\r\n" + b"x" * (4 * 1024 * 1024 + 100 * 1024)
    r = client.post(
        "/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413 and "the limit is 4.1 MB" in r.json()["detail"], r.text


def test_requests_over_the_cap_get_503_with_retry_after(live: tuple[int, ServeSettings]) -> None:
    """Issue 20.8: nothing capped concurrent requests. With max_requests=1, a second request
    while one is uploading is turned away at once, with Retry-After; a slow body gets 408."""
    port, _ = live
    slow = _connect(port)
    slow.sendall(
        b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n"
        b'Content-Type: application/json\r\n\r\n{"images": ['
    )
    time.sleep(0.2)
    second = _connect(port)
    body = json.dumps({"images": [base64.b64encode(png_bytes()).decode()]}).encode()
    second.sendall(
        b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    status, raw = _response(second)
    assert status == 503 and b"retry-after: 1" in raw.lower(), raw[:300]
    status, raw = _response(slow)  # read_timeout_s=1: the body never came
    assert status == 408 and b"did not arrive within 1 s" in raw
    slow.close()
    second.close()


def test_admission_counts_requests_and_bytes() -> None:
    from fastapi import HTTPException

    admission = Admission(ServeSettings(max_requests=2, max_inflight_mb=1))
    budget = ServeSettings(max_inflight_mb=1).inflight_bytes  # raised to one largest request
    with admission.request() as take:
        take(budget - 10)
        with admission.request() as take2, pytest.raises(HTTPException) as exc:
            take2(11)
        assert exc.value.status_code == 503 and exc.value.headers["Retry-After"] == "2"
        with admission.request(), pytest.raises(HTTPException) as exc:
            with admission.request():
                pass
        assert exc.value.status_code == 503 and exc.value.headers["Retry-After"] == "1"
    assert admission.requests == 0 and admission.bytes == 0


def _deep(depth: int) -> bytes:
    return b'{"images": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    "body, ctype, words",
    [
        (_deep(100_000), "application/json", "nested too deeply"),
        (json.dumps({"images": [{"name": 123, "data": "aGk="}]}).encode(), "application/json",
         "images[0].name must be a string"),
        (b'{"images": "abc"}', "application/json", "must be a list"),
        (b'{"images": [{"data": 5}]}', "application/json", "base64 string"),
        (b'{"images": [null, {}]}', "application/json", "base64 string"),
        (b"[1, 2, 3]", "application/json", '{"images"'),
        (b'"images"', "application/json", '{"images"'),
        (b"null", "application/json", '{"images"'),
        (b'{"images": []}', "application/json", "empty"),
        (b'{"image": 1e999}', "application/json", "base64"),
        (b"\xff\xfe{}", "application/json", "JSON"),
        (b'{"images": ["' + b"A" * 2_000_000 + b'"]}', "application/json", "limit of 1 MB"),
        (b"--b\r\ngarbage", "multipart/form-data; boundary=b", ""),
        (b"whatever", "multipart/form-data", "boundary"),
        (b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nhi\r\n--b--\r\n",
         "multipart/form-data; boundary=b", "not text"),
        (b"\x00" * 1000, "multipart/form-data; boundary=" + "x" * 200, ""),
        (b"\x00\x01", "image/png", "multipart"),
    ],
)  # fmt: skip
def test_client_garbage_never_gets_a_5xx(
    client: TestClient, body: bytes, ctype: str, words: str
) -> None:
    """Issue 20.9: deep JSON (RecursionError) and a non-string name (AttributeError) were
    500s. Every malformed request is now a 4xx that says what is wrong."""
    r = client.post("/predict", content=body, headers={"content-type": ctype})
    assert 400 <= r.status_code < 500, r.text[:300]
    assert words in r.json()["detail"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_mb", float("nan")),
        ("max_mb", float("inf")),
        ("max_mb", -1.0),
        ("max_mb", 0),
        ("max_mb", "20"),
        ("max_files", 0),
        ("max_files", 2.5),
        ("max_files", True),
        ("top_k", 1001),
        ("max_batch", -3),
        ("max_megapixels", 1e6),
        ("read_timeout_s", float("nan")),
        ("max_requests", 0),
    ],
)
def test_settings_refuse_values_they_cannot_serve(field: str, value: object) -> None:
    """Issue 20.9: `graft serve --max-mb nan` started, then answered every /predict with 500.
    ServeSettings itself refuses such values, so library users are covered too."""
    with pytest.raises(UsageError, match=field.replace("_", "[-_]")):
        ServeSettings(**{field: value})


def test_connections_that_never_finish_their_headers_are_closed(
    live: tuple[int, ServeSettings],
) -> None:
    """Issue 20.10: 50 connections sending partial headers stayed open forever. After
    header_timeout_s (0.5 s here) without a complete request line and headers, each is
    closed; a keep-alive connection gets the same deadline after its response."""
    port, _ = live
    started = time.monotonic()
    conns = [_connect(port) for _ in range(20)]
    for conn in conns:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    for conn in conns:
        assert conn.recv(1024) == b""  # closed by the server, not by our 5 s timeout
        conn.close()
    kept = _connect(port)
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _ = _response(kept)
    kept.sendall(b"GET /health HTTP/1.1\r\n")  # the next request, never finished
    assert status == 200 and kept.recv(1024) == b""
    kept.close()
    assert time.monotonic() - started < 4
    big = _connect(port)
    big.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000)
    status, _ = _response(big)
    assert status in (400, 431)  # unfinished headers over 16 KB are refused, not buffered
    big.close()


def test_docs_load_nothing_from_the_internet(client: TestClient) -> None:
    """Issue 20.11: /docs pulled Swagger UI from a CDN, so it was blank offline."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert re.findall(r"https?://", page.text) == []
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert client.get("/redoc").status_code == 404  # ReDoc exists only on a CDN: left out


def test_report_does_not_reveal_local_paths(
    trained_run: Path, shapes_dir: Path, tmp_path: Path
) -> None:
    """Issue 20.11: /report showed the absolute data path to any client."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    on_disk = (run / "report.html").read_text()
    data_root = str(shapes_dir.resolve())
    assert data_root in on_disk  # the file keeps it: it is the owner's record
    with TestClient(create_app(run)) as c:
        served = c.get("/report").text
    for secret in (data_root, str(tmp_path), str(Path.home())):
        assert secret not in served
    assert shapes_dir.name in served and "<html" in served.lower()


def test_a_port_in_use_is_a_system_error_and_a_bad_port_a_usage_error(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20.12: a taken port exited 3 (data errors) and --port 99999 was an
    'unexpected error'. Now: exit 8 and exit 2, each saying what to do."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(trained_run), "--port", str(port)]) == 8
        err = capsys.readouterr().err
        assert f"port {port} on 127.0.0.1 is in use: choose another --port" in err
        assert "Serving" not in err
        with pytest.raises(SystemResourceError):
            build_server(trained_run, "127.0.0.1", port)
    for bad in (99999, 0, -1, "80", 80.0, True):  # library callers: serve() checks too
        with pytest.raises(UsageError, match="--port must be a whole number from 1 to 65535"):
            build_server(trained_run, "127.0.0.1", bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--host"):
        build_server(trained_run, "no such host.invalid", 8000)


# ----------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX export made by `graft export` from a copy of the session's run."""
    run = tmp_path_factory.mktemp("serve-export") / "run"
    shutil.copytree(trained_run, run)
    out = run.parent / "exp"
    assert main(["export", str(run), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # cut short: not JSON
        lambda text: json.dumps({**json.loads(text), "format": "tflite"}),  # no such format
        lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "classes"}),
    ],
    ids=["truncated", "unknown-format", "no-classes"],
)
def test_a_damaged_export_is_a_run_folder_error(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage
) -> None:
    """`graft serve` on an export whose graft.json is damaged raised runtime.ExportError, a
    ValueError, and ended as "unexpected error ... a bug in graft" (exit 1). Now exit 6,
    naming the file."""
    from graft.errors import RunFolderError
    from graft.runtime import METADATA_FILE

    out = tmp_path / "exp"
    shutil.copytree(exported, out)
    meta = out / METADATA_FILE
    meta.write_text(damage(meta.read_text()))
    with pytest.raises(RunFolderError, match=r"graft\.json"):
        create_app(out)
    capsys.readouterr()
    assert main(["serve", str(out), "--port", str(_free_port())]) == 6
    err = capsys.readouterr().err
    assert "graft.json" in err and "graft export" in err and "bug" not in err
    assert "Serving" not in err  # only said once the model has loaded and answers


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores_are_that_images_error(
    exported: Path, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    """Serving an export called its engine directly, skipping the non-finite guard of
    ExportedModel.predict: a NaN score reached the JSON encoder and the whole request got a
    500. Now that image's entry is an error (runtime.NON_FINITE); the others are answered."""
    from graft.runtime import NON_FINITE, ExportedModel

    load = ExportedModel._load

    def broken_first_row(self: ExportedModel, path: Path, threads: int | None):  # type: ignore[no-untyped-def]
        run = load(self, path, threads)

        def poisoned(x: np.ndarray) -> np.ndarray:
            probs = np.array(run(x), dtype=np.float32)
            probs[0, 0] = bad
            return probs

        return poisoned

    monkeypatch.setattr(ExportedModel, "_load", broken_first_row)
    with TestClient(create_app(exported)) as c:
        files = [("file", ("nan.png", png_bytes("circle", 1))), ("file", ("ok.png", png_bytes()))]
        r = c.post("/predict", files=files)
    assert r.status_code < 500, r.text
    first, second = r.json()["predictions"]
    assert first == {"name": "nan.png", "error": NON_FINITE}
    assert second["name"] == "ok.png" and second["top"][0]["class"] in c.app.state.model.classes
