"""`graft serve`: the HTTP API answers like graft's predict, batches concurrent requests, and
meets every bad request with a 4xx and a clear message."""

from __future__ import annotations

import asyncio
import base64
import io
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import draw_shape
from graft.export import export_run
from graft.predict import Predictor
from graft.serve import Batcher, ServeSettings, create_app


def png_bytes(shape: str = "circle", seed: int = 1, size: int = 64) -> bytes:
    buf = io.BytesIO()
    draw_shape(shape, random.Random(seed), size).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(trained_run: Path):
    with TestClient(create_app(trained_run, ServeSettings(max_mb=1, max_files=4))) as c:
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
