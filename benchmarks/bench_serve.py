"""Load test of `graft serve`: N concurrent clients on loopback against a real uvicorn server.

    python benchmarks/bench_serve.py runs/demo --requests 2000 --concurrency 16

Starts `python -m graft serve RUN` on a free port, waits for /readyz, then sends the requests
(one image each, multipart) from an asyncio httpx client: first at concurrency 1 (a
baseline), then at the asked concurrency. Prints requests/s, p50/p99 latency, errors and how
many images the server batched per model call. The client shares the machine's cores with
the server, so figures are a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_images(run: Path, n: int = 32) -> list[tuple[str, bytes]]:
    config = json.loads((run / "config.json").read_text())
    root = Path(config["data_root"])
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    step = max(1, len(files) // n)
    return [(p.name, p.read_bytes()) for p in files[::step][:n]]


async def load(url: str, images: list, total: int, concurrency: int) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            name, data = images[i % len(images)]
            t = time.perf_counter()
            try:
                r = await client.post(url + "/predict", files={"file": (name, data)})
                ok = r.status_code == 200 and "label" in r.json()["predictions"][0]
                key = None if ok else f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            latencies.append(time.perf_counter() - t)
            if key:
                errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": total,
        "seconds": round(wall, 2),
        "requests_per_s": round(total / wall, 1),
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="runs/demo", help="run or export folder")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    run = Path(args.run)
    images = pick_images(run if (run / "config.json").is_file() else run.parent)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "graft", "serve", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # not listening yet, or warming up (503)
        else:
            raise SystemExit(
                f"server did not start: {server.stderr.read() if server.stderr else ''}"
            )
        engine = httpx.get(url + "/model").json()["engine"]
        asyncio.run(load(url, images, 50, 4))  # warm-up
        base = asyncio.run(load(url, images, max(100, args.requests // 10), 1))
        loaded = asyncio.run(load(url, images, args.requests, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = {
        "run": str(run),
        "engine": engine,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "baseline": base,
        "loaded": loaded,
        "throughput_ratio": round(loaded["requests_per_s"] / base["requests_per_s"], 2),
    }
    for r in (base, loaded):
        print(
            f"concurrency {r['concurrency']:>3}: {r['requests']} requests in {r['seconds']} s = "
            f"{r['requests_per_s']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"errors {r['errors']} {r['error_kinds'] or ''}"
        )
    print(
        f"throughput at concurrency {args.concurrency} / concurrency 1: "
        f"{results['throughput_ratio']}x  (engine: {engine})"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if loaded["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
