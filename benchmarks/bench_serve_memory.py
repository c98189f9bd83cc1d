"""Server memory under the largest requests `graft serve` accepts (issue 20, item 8).

    python benchmarks/bench_serve_memory.py                  # trains a tiny run first
    python benchmarks/bench_serve_memory.py --run runs/demo --json serve_memory.json

Starts `python -m graft serve RUN` (default limits) on a free loopback port and measures the
server process's resident memory (/proc/PID/status: VmRSS sampled every 20 ms, VmHWM for the
peak) while clients send, at the server's request cap (``max_requests``) at once:

  pixels   each request max_files PNGs at the pixel budget (``max_megapixels``): RGBA with a
           drawn shape, the costliest to decode (alpha compositing, background trim), a few
           KB each on the wire; --pixel-concurrency requests at once (decoding is serialised
           by the pixel gate, so more only makes it longer);
  bodies   each request the largest multipart body (``request_bytes``: files of max_mb of
           random bytes), then the same as JSON (base64, x4/3): the body limits and the
           bytes-in-flight cap (``max_inflight_mb``, more is answered 503) are what hold it.

Then waits 3 s idle and reads RSS again (memory handed back). Prints PASS when the peak stays
within --budget-mb of the idle server's RSS (the model's own size varies by backbone and
engine), and a JSON of the figures. Bounded: a phase stops after --timeout s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from graft.serve import MB, ServeSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def tiny_run(tmp: Path) -> Path:
    """A demo-like run trained by the CLI on a few drawn shapes (about a minute on 2 cores)."""
    data = tmp / "shapes"
    for cls, shape in enumerate(("ellipse", "rectangle", "polygon")):
        (data / shape).mkdir(parents=True)
        for i in range(12):
            im = Image.new("RGB", (64, 64), "white")
            d, o = ImageDraw.Draw(im), 8 + (i % 5) * 3
            box = (o, o, 64 - o + cls, 64 - o)
            if shape == "polygon":
                d.polygon([(32, o), (o, 64 - o), (64 - o, 64 - o)], fill=(200, 30 * cls, i * 9))
            else:
                getattr(d, shape)(box, fill=(i * 9, 200, 40 * cls))
            im.save(data / shape / f"{i}.png")
    out = tmp / "run"
    cmd = [
        sys.executable,
        "-m",
        "graft",
        "train",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--fine-tune-epochs",
        "0",
        "--img-size",
        "64",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def budget_png(pixels: float) -> bytes:
    """An RGBA PNG of exactly the pixel budget (or just under): mostly transparent, a shape in
    the middle, so it compresses to a few KB but decodes to the full size."""
    side = int(pixels**0.5)
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((side // 4, side // 4, 3 * side // 4, side // 2), (200, 0, 0, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))
            time.sleep(0.02)


async def phase(url: str, n: int, send: dict, timeout: float) -> dict:
    """n identical requests at once; their status codes and the wall time."""
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n)) as c:
        t = time.perf_counter()

        async def one() -> str:
            try:
                return str((await c.post(url + "/predict", **send)).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        codes = await asyncio.gather(*[one() for _ in range(n)])
        return {"status": dict(Counter(codes)), "seconds": round(time.perf_counter() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, help="run or export folder (default: train a tiny run)")
    ap.add_argument(
        "--budget-mb", type=float, default=1024, help="peak RSS growth over idle allowed (1 GB)"
    )
    ap.add_argument("--concurrency", type=int, help="requests at once (default: max_requests)")
    ap.add_argument(
        "--pixel-concurrency",
        type=int,
        default=8,
        help="requests at once in the pixels phase (decoding is serialised by the pixel gate)",
    )
    ap.add_argument("--timeout", type=float, default=300, help="seconds per phase")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    s = ServeSettings()
    n = args.concurrency or s.max_requests
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or tiny_run(Path(tmp))
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "graft", "serve", str(run), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)  # not listening yet, or warming up (503)
            idle = status_kb(server.pid, "VmRSS")
            png = budget_png(s.max_megapixels * 1e6)
            blob = os.urandom(s.max_bytes)
            files = s.request_bytes // s.max_bytes
            b64 = base64.b64encode(blob).decode()
            sends = {
                "pixels": {"files": [("file", (f"{i}.png", png)) for i in range(s.max_files)]},
                "bodies_multipart": {"files": [("file", (f"{i}.bin", blob)) for i in range(files)]},
                "bodies_json": {"json": {"images": [b64] * files}},
            }
            phases = {}
            for name, send in sends.items():
                sampler = Sampler(server.pid)
                sampler.start()
                k = min(n, args.pixel_concurrency) if name == "pixels" else n
                phases[name] = asyncio.run(phase(url, k, send, args.timeout))
                sampler.stop.set()
                sampler.join()
                phases[name].update(concurrency=k, rss_peak_mb=round(sampler.peak_kb / 1024))
            time.sleep(3)  # idle: the server hands memory back (malloc_trim)
            after = status_kb(server.pid, "VmRSS")
            peak = max(
                status_kb(server.pid, "VmHWM"), *(p["rss_peak_mb"] * 1024 for p in phases.values())
            )
        finally:
            server.terminate()
            server.wait(30)
    result = {
        "run": str(run) if args.run else "tiny run (3 classes, 64 px, 1 epoch)",
        "concurrency": n,
        "limits": {
            "max_files": s.max_files,
            "max_megapixels": s.max_megapixels,
            "max_mb": s.max_mb,
            "request_mb": s.request_bytes / MB,
            "inflight_mb": s.inflight_bytes / MB,
        },
        "image_png_kb": round(len(png) / 1024, 1),
        "phases": phases,
        "rss_idle_mb": round(idle / 1024),
        "rss_peak_mb": round(peak / 1024),
        "rss_after_mb": round(after / 1024),
        "growth_mb": round((peak - idle) / 1024),
        "budget_growth_mb": args.budget_mb,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    growth = (peak - idle) / 1024
    ok = growth <= args.budget_mb and all(
        set(p["status"]) <= {"200", "413", "415", "503"} for p in phases.values()
    )
    print(json.dumps(result, indent=2))
    verdict = "PASS" if ok else "FAIL"
    print(
        f"{verdict}: peak RSS {peak / 1024:.0f} MB, {growth:.0f} MB over idle (budget "
        f"{args.budget_mb:g} MB over idle)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
