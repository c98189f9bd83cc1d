"""Soak and overload test of `graft serve` with an API key (issue 18), on loopback only.

    python benchmarks/bench_serve_soak.py                        # trains and exports a tiny run
    python benchmarks/bench_serve_soak.py --run EXPORT_OR_RUN --requests 20000 \\
        --concurrency 32 --json benchmarks/results/serve-soak.json

Starts `python -m graft serve SOURCE --api-key-file KEYS --log-format json` on a free loopback
port (stderr to a file), waits for /readyz, then:

  warm-up   --warmup requests, not counted;
  soak      --requests requests from --concurrency clients, each sending its next request
            when answered; one in ten is bad (not an image, a cut PNG, an empty file, no
            field, bad base64, bad JSON, wrong Content-Type, too many files, no key, a wrong
            key), the rest one good image (multipart or JSON, alternately). The server's
            resident memory is read from /proc every 500 answers;
  overload  requests sent at --overload-factor times the soak's throughput, each on its own
            schedule whatever the answers (an open loop), for --overload-seconds, over at
            most --connections keep-alive connections (below the server's --max-connections,
            so that what is measured is the queue and the deadline, not the connection cap);

then sends SIGTERM and waits for the exit code. The client is asyncio on raw sockets (a
prepared request, keep-alive connections), light enough to leave the cores to the server.

PASS when: the soak has 0 5xx, every bad request a 4xx and every good one a 200; RSS in its
last 2,000 answers is under 50 MB above RSS in its first 2,000; in overload the p99 of answered
requests is under the deadline and every other answer is a 503 with Retry-After; the access
log has one line per request and no key; the server exits 0. Bounded: each phase has a time
limit (--phase-timeout), and the request counts are fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import platform
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_serve_memory import status_kb, tiny_run  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def shape_png(i: int) -> bytes:
    rng = random.Random(i)
    im = Image.new("RGB", (64, 64), tuple(rng.randint(180, 255) for _ in range(3)))
    d, o = ImageDraw.Draw(im), rng.randint(4, 16)
    fill = tuple(rng.randint(0, 150) for _ in range(3))
    [d.ellipse, d.rectangle][i % 2]((o, o, 64 - o, 64 - o), fill=fill)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def http(method: str, path: str, body: bytes, ctype: str | None, key: str | None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"Content-Length: {len(body)}"]
    if ctype:
        head.append(f"Content-Type: {ctype}")
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    parts = []
    for name, data in files:
        parts.append(
            b'--bnd\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n%s\r\n"
            % (field.encode(), name.encode(), data)
        )
    return b"".join(parts) + b"--bnd--\r\n", "multipart/form-data; boundary=bnd"


def requests_to_send(key: str) -> tuple[list[bytes], dict[str, bytes]]:
    """Good requests (one image each, multipart and JSON) and one of each bad kind."""
    good = []
    for i in range(32):
        data = shape_png(i)
        if i % 2:
            body, ctype = multipart([(f"img{i}.png", data)])
        else:
            body = json.dumps({"images": [base64.b64encode(data).decode()]}).encode()
            ctype = "application/json"
        good.append(http("POST", "/predict", body, ctype, key))
    png = shape_png(0)
    bad = {
        "not_an_image": http("POST", "/predict", *multipart([("a.jpg", b"hello")]), key),
        "cut_png": http("POST", "/predict", *multipart([("a.png", png[:120])]), key),
        "empty_file": http("POST", "/predict", *multipart([("a.png", b"")]), key),
        "no_file_field": http("POST", "/predict", *multipart([("a.png", png)], "pic"), key),
        "bad_base64": http("POST", "/predict", b'{"images": ["%%%"]}', "application/json", key),
        "bad_json": http("POST", "/predict", b'{"images": [', "application/json", key),
        "wrong_type": http("POST", "/predict", png, "image/png", key),
        "too_many_files": http(
            "POST", "/predict", *multipart([(f"{i}.png", png) for i in range(17)]), key
        ),
        "no_key": http("POST", "/predict", *multipart([("a.png", png)]), None),
        "wrong_key": http("POST", "/predict", *multipart([("a.png", png)]), "x" * 32),
    }
    return good, bad


class Client:
    """HTTP/1.1 over keep-alive loopback connections, a prepared request at a time. Like a
    browser or httpx, it sends again, once, on a new connection when a kept one turns out to
    have been closed by the server (its keep-alive timeout) before any answer came."""

    def __init__(self, port: int):
        self.port, self.idle, self.resent = port, collections.deque(), 0

    async def send(self, raw: bytes) -> tuple[int, dict[bytes, bytes]]:
        while self.idle:
            reader, writer = self.idle.popleft()  # the longest idle first: none goes stale
            if not reader.at_eof() and not writer.is_closing():
                try:
                    return await self._send(reader, writer, raw)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise
                    self.resent += 1
                except (ConnectionResetError, BrokenPipeError):
                    self.resent += 1
            else:
                writer.close()
        return await self._send(*await asyncio.open_connection(HOST, self.port), raw)

    async def _send(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
    ) -> tuple[int, dict[bytes, bytes]]:
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            await reader.readexactly(int(headers.get(b"content-length", b"0")))
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            raise
        if headers.get(b"connection") == b"close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(lines[0].split(b" ", 2)[1]), headers

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def closed_loop(
    port: int, total: int, concurrency: int, good: list[bytes], bad: dict[str, bytes], pid: int
) -> dict[str, Any]:
    """``total`` requests from ``concurrency`` clients, one bad in ten; RSS every 500."""
    client, kinds = Client(port), list(bad)
    counter, done = iter(range(total)), 0
    statuses: dict[str, Counter] = {"good": Counter(), **{k: Counter() for k in kinds}}
    latencies: list[float] = []
    rss: list[tuple[int, float]] = []

    async def worker() -> None:
        nonlocal done
        for i in counter:
            kind = kinds[(i // 10) % len(kinds)] if i % 10 == 9 else "good"
            raw = bad[kind] if kind != "good" else good[i % len(good)]
            t = time.perf_counter()
            try:
                status, _ = await client.send(raw)
                key = str(status)
            except (OSError, asyncio.IncompleteReadError) as exc:
                key = type(exc).__name__
            if kind == "good":
                latencies.append(time.perf_counter() - t)
            statuses[kind][key] += 1
            done += 1
            if done % 500 == 0:
                rss.append((done, status_kb(pid, "VmRSS") / 1024))

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - start
    client.close()
    lat = sorted(latencies)
    return {
        "requests": total,
        "concurrency": concurrency,
        "seconds": round(wall, 1),
        "requests_per_s": round(total / wall, 1),
        "good_p50_ms": round(1000 * statistics.median(lat), 1),
        "good_p99_ms": p99(lat),
        "statuses": {k: dict(v) for k, v in statuses.items()},
        "resent_on_a_closed_keepalive": client.resent,
        "rss_mb": [(n, round(mb, 1)) for n, mb in rss],
    }


async def open_loop(
    port: int, rate: float, seconds: float, good: list[bytes], connections: int
) -> dict[str, Any]:
    """Good requests on a schedule of ``rate`` per second for ``seconds``, whatever the
    answers (an open loop), over up to ``connections`` keep-alive connections (fewer than
    the server's cap, so the figures are the queue's and the deadline's, not the connection
    limit's). A request goes out at its time on a free connection; when all are busy it goes
    late, and ``late_p99_ms`` says how late. Latency runs from when it is written."""
    client, loop = Client(port), asyncio.get_running_loop()
    answers: list[tuple[str, float, bool]] = []
    late: list[float] = []
    start, total = loop.time(), int(rate * seconds)
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            due = start + i / rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            late.append(max(0.0, loop.time() - due))
            t = time.perf_counter()
            try:
                status, headers = await client.send(good[i % len(good)])
                answers.append((str(status), time.perf_counter() - t, b"retry-after" in headers))
            except (OSError, asyncio.IncompleteReadError) as exc:
                answers.append((type(exc).__name__, time.perf_counter() - t, False))

    await asyncio.gather(*[worker() for _ in range(connections)])
    wall = loop.time() - start
    client.close()
    ok = sorted(s for status, s, _ in answers if status == "200")
    refused = [(s, retry) for status, s, retry in answers if status == "503"]
    return {
        "target_rate": round(rate, 1),
        "connections": connections,
        "sent": len(answers),
        "sent_rate": round(len(answers) / wall, 1),
        "late_p99_ms": p99(late),
        "statuses": dict(Counter(status for status, _, _ in answers)),
        "resent_on_a_closed_keepalive": client.resent,
        "answered_per_s": round(len(ok) / wall, 1),
        "answered_p50_ms": round(1000 * statistics.median(ok), 1) if ok else None,
        "answered_p99_ms": p99(ok),
        "answered_max_ms": round(1000 * ok[-1], 1) if ok else None,
        "refused_503_with_retry_after": sum(retry for _, retry in refused),
        "refused_p50_ms": round(1000 * statistics.median(s for s, _ in refused), 1)
        if refused
        else None,
        "refused_p99_ms": p99([s for s, _ in refused]),
    }


def p99(seconds: list[float]) -> float | None:
    """The 99th percentile in ms (nearest rank), None for no values."""
    if not seconds:
        return None
    return round(1000 * sorted(seconds)[int(0.99 * (len(seconds) - 1))], 1)


def prepare_source(run: Path | None, tmp: Path) -> Path:
    """``run`` as given, or a tiny run trained here and exported to ONNX."""
    if run is not None:
        return run
    trained = tiny_run(tmp)
    out = tmp / "export"
    cmd = [sys.executable, "-m", "graft", "export", str(trained), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def wait_ready(port: int, server: subprocess.Popen, limit: float) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end and server.poll() is None:
        try:
            with socket.create_connection((HOST, port), timeout=2) as conn:
                conn.sendall(http("GET", "/readyz", b"", None, None))
                if conn.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not become ready (exit code {server.poll()})")


def shed_counts(port: int, key: str) -> dict[str, float]:
    """graft_shed_requests_total by reason, read from /metrics with prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    with socket.create_connection((HOST, port), timeout=10) as conn:
        conn.sendall(http("GET", "/metrics", b"", None, key).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    text = data.partition(b"\r\n\r\n")[2].decode()
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "graft_shed_requests"
        for s in family.samples
        if s.name.endswith("_total")
    }


def verdicts(soak: dict, over: dict, log: dict, exit_code: int | None, deadline_ms: float) -> dict:
    st = soak["statuses"]
    # a 5xx, or no answer at all (the connection reset or closed)
    five = sum(n for kind in st.values() for code, n in kind.items() if code[0] not in "1234")
    bad_4xx = all(code.startswith("4") for k, v in st.items() if k != "good" for code in v)
    rss = soak["rss_mb"]
    first = [mb for n, mb in rss if n <= 2000]
    last = [mb for n, mb in rss if n > soak["requests"] - 2000]
    growth = max(last) - max(first)
    others = {k: v for k, v in over["statuses"].items() if k not in ("200", "503")}
    return {
        "soak_no_5xx_or_transport_errors": five == 0,
        "soak_every_bad_request_4xx": bad_4xx,
        "soak_every_good_request_200": set(st["good"]) == {"200"},
        "rss_growth_first_to_last_2000_mb": round(growth, 1),
        "rss_growth_under_50_mb": growth < 50,
        "overload_p99_answered_under_deadline": (over["answered_p99_ms"] or 0) < deadline_ms,
        "overload_rest_all_503_with_retry_after": not others
        and over["refused_503_with_retry_after"] == over["statuses"].get("503", 0),
        "log_one_line_per_request": log["lines"] == log["requests"],
        "log_has_no_key": not log["key_found"],
        "exit_code_0_on_sigterm": exit_code == 0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, help="run or export folder (default: a tiny run)")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--overload-factor", type=float, default=4.0)
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    ap.add_argument(
        "--connections", type=int, default=400, help="overload: client connections at most"
    )
    ap.add_argument("--max-connections", type=int, default=512, help="the server's")
    ap.add_argument(
        "--timeout-ms", type=float, default=10_000, help="the server's deadline (its default)"
    )
    ap.add_argument("--max-queue", type=int, default=128, help="the server's (its default)")
    ap.add_argument("--phase-timeout", type=float, default=900, help="seconds per phase")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.requests < 4000:
        raise SystemExit("--requests must be at least 4000 (two windows of 2,000)")
    key = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = prepare_source(args.run, tmp)
        keys = tmp / "keys"
        keys.write_text(f"# bench key\n{key}\n")
        keys.chmod(0o600)
        port, log_path = free_port(), tmp / "serve.log"
        cmd = [sys.executable, "-m", "graft", "serve", str(source), "--port", str(port)]
        cmd += ["--api-key-file", str(keys), "--log-format", "json"]
        cmd += ["--timeout-ms", str(args.timeout_ms), "--max-queue", str(args.max_queue)]
        cmd += ["--max-connections", str(args.max_connections)]
        env = {k: v for k, v in os.environ.items() if k != "GRAFT_API_KEY"}
        with open(log_path, "w") as log_file:
            server = subprocess.Popen(cmd, stderr=log_file, stdout=subprocess.DEVNULL, env=env)
        try:
            wait_ready(port, server, 300)
            good, bad = requests_to_send(key)

            def run(coro: Any) -> Any:
                return asyncio.run(asyncio.wait_for(coro, args.phase_timeout))

            run(closed_loop(port, args.warmup, args.concurrency, good, bad, server.pid))
            rss_ready = status_kb(server.pid, "VmRSS") / 1024
            before = shed_counts(port, key)
            soak = run(closed_loop(port, args.requests, args.concurrency, good, bad, server.pid))
            after = shed_counts(port, key)
            soak["shed"] = {k: v - before.get(k, 0) for k, v in after.items()}
            rate = args.overload_factor * soak["requests_per_s"]
            over = run(open_loop(port, rate, args.overload_seconds, good, args.connections))
            over["shed"] = {k: v - after.get(k, 0) for k, v in shed_counts(port, key).items()}
            server.send_signal(signal.SIGTERM)
            exit_code = server.wait(60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    served = [line for line in lines if line.get("route") == "/predict"]
    # the server's own view of the overload (from arrival to answer, in its log)
    answered = [line["ms"] / 1000 for line in served[-over["sent"] :] if line["status"] == 200]
    over["server_side_answered_p99_ms"] = p99(answered)
    log = {
        "requests": args.warmup + args.requests + over["sent"],
        "lines": len(served),
        "key_found": key in text,
        "stopping_line": any("Stopping" in line.get("message", "") for line in lines),
    }
    result = {
        "source": str(args.run)
        if args.run
        else "tiny run (3 classes, 64 px, 1 epoch), ONNX export",
        "server": {
            "timeout_ms": args.timeout_ms,
            "max_queue": args.max_queue,
            "max_connections": args.max_connections,
            "auth": "api key",
        },
        "rss_after_warmup_mb": round(rss_ready, 1),
        "soak": soak,
        "overload": over,
        "log": log,
        "exit_code": exit_code,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
    }
    result["verdicts"] = verdicts(soak, over, log, exit_code, args.timeout_ms)
    ok = all(v for k, v in result["verdicts"].items() if isinstance(v, bool))
    print(json.dumps(result, indent=2))
    summary = ", ".join(f"{k}={v}" for k, v in result["verdicts"].items())
    print(("PASS" if ok else "FAIL") + ": " + summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
