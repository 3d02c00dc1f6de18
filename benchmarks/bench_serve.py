"""Load generator for `qalign serve`: 1 sequential client vs N concurrent clients (micro-batched).

Starts `qalign serve` in a subprocess on a free loopback port, sends one-image multipart requests
(threads + httpx, bounded by a request count AND a time limit per phase), and prints a table:
requests/s, images/s, p50/p95 latency, errors and the server's mean batch size, with the machine.

    python benchmarks/bench_serve.py                      # tiny random model (+ the real qalign-tiny
                                                          #   when its weights are installed)
    python benchmarks/bench_serve.py --model qalign-tiny --requests 200 --seconds 30
    python benchmarks/bench_serve.py --json runs/bench_serve.json

Only 127.0.0.1 is ever contacted. The server is stopped at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_TINY = REPO / "src" / "qalign" / "weights" / "qalign-tiny" / "trained.safetensors"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {"cpu": cpu, "cores": usable, "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def make_images(n: int, size: int | None) -> list[bytes]:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import make_image

    out = []
    for i in range(n):
        image = make_image(i, size=(size, size) if size else None)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_tiny_random(folder: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import build_tiny_folder

    return str(build_tiny_folder(folder))


class Server:
    """`qalign serve` in a subprocess on 127.0.0.1, port chosen by the OS."""

    def __init__(self, model: str, extra: list[str]):
        cmd = [sys.executable, "-m", "qalign", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
               "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = None

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        end = time.monotonic() + timeout
        while self.url is None:
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError("server did not start:\n" + "".join(self.log[-20:]))
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
        assert self.url.startswith("http://127.0.0.1:"), self.url
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while True:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("model did not load:\n" + "".join(self.log[-20:]))
                r = c.get("/readyz")
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"model failed to load: {r.json().get('error')}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run_phase(url: str, images: list[bytes], clients: int, max_requests: int, max_seconds: float,
              per_request: int = 1) -> dict:
    """``clients`` threads send requests until ``max_requests`` were sent or ``max_seconds`` passed."""
    import httpx

    lock = threading.Lock()
    state = {"sent": 0}
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    deadline = [0.0]

    def take() -> int | None:
        with lock:
            if state["sent"] >= max_requests or time.monotonic() >= deadline[0]:
                return None
            state["sent"] += 1
            return state["sent"] - 1

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            barrier.wait()
            while (k := take()) is not None:
                files = [("file", (f"img{k}_{j}.png", images[(k * per_request + j) % len(images)], "image/png"))
                         for j in range(per_request)]
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/score", files=files)
                    ok = r.status_code == 200 and all(row["error"] is None for row in r.json()["results"])
                    if not ok:
                        errors.append(f"{r.status_code}: {r.text[:120]}")
                except httpx.HTTPError as exc:
                    ok = False
                    errors.append(f"{type(exc).__name__}: {exc}")
                dt = time.perf_counter() - t0
                if ok:
                    with lock:
                        latencies.append(dt)

    with httpx.Client(base_url=url, timeout=10) as c:
        before = c.get("/v1/stats").json()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + max_seconds
    t_start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join(max_seconds + 180)
    wall = time.perf_counter() - t_start
    with httpx.Client(base_url=url, timeout=10) as c:
        after = c.get("/v1/stats").json()
    done = len(latencies)
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan")

    batches = after["batches"] - before["batches"]
    items = after["items"] - before["items"]
    return {"clients": clients, "requests": done, "errors": len(errors), "wall_s": round(wall, 3),
            "req_per_s": round(done / wall, 2), "img_per_s": round(done * per_request / wall, 2),
            "p50_ms": round(pct(0.50), 1), "p95_ms": round(pct(0.95), 1),
            "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None,
            "mean_batch": round(items / batches, 2) if batches else None, "model_calls": batches,
            "model_busy_pct": round(100 * (after["model_busy_s"] - before["model_busy_s"]) / wall, 1),
            "first_errors": errors[:3]}


def bench_model(label: str, model: str, args, images: list[bytes]) -> list[dict]:
    extra = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
             "--max-queue", str(max(256, 2 * args.clients * args.per_request)), "--device", args.device]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    server = Server(model, extra)
    rows = []
    try:
        server.wait_ready(args.load_timeout)
        print(f"[{label}] server ready at {server.url}", file=sys.stderr)
        run_phase(server.url, images, 1, args.warmup, 30, args.per_request)  # warm-up
        for clients in (1, args.clients):
            res = run_phase(server.url, images, clients, args.requests, args.seconds, args.per_request)
            res["model"] = label
            res["mode"] = "sequential" if clients == 1 else "concurrent (micro-batched)"
            rows.append(res)
            print(f"[{label}] {clients} client(s): {res['req_per_s']} req/s, p50 {res['p50_ms']} ms, "
                  f"mean batch {res['mean_batch']}, model busy {res['model_busy_pct']}%, errors {res['errors']}", file=sys.stderr)
    finally:
        server.stop()
    if len(rows) == 2 and rows[0]["img_per_s"]:
        rows[1]["speedup"] = round(rows[1]["img_per_s"] / rows[0]["img_per_s"], 2)
    return rows


def table(rows: list[dict]) -> str:
    head = ["model", "mode", "clients", "requests", "req/s", "img/s", "p50 ms", "p95 ms", "mean batch",
            "speedup", "errors"]
    body = [[r["model"], r["mode"], r["clients"], r["requests"], r["req_per_s"], r["img_per_s"], r["p50_ms"],
             r["p95_ms"], r["mean_batch"], r.get("speedup", "1.00" if r["clients"] == 1 else "-"), r["errors"]]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="model to serve (name or folder; repeatable). Default: a tiny "
                                                    "random model, plus qalign-tiny when its weights exist")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients in the batched phase")
    p.add_argument("--requests", type=int, default=400, help="most requests per phase")
    p.add_argument("--seconds", type=float, default=20.0, help="most seconds per phase")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--per-request", type=int, default=1, help="images per request")
    p.add_argument("--images", type=int, default=64, help="distinct test images")
    p.add_argument("--image-size", type=int, default=None, help="square test images of this size (default: ~50x40)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-timeout", type=float, default=300.0)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    info = machine()
    images = make_images(args.images, args.image_size)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        models = [(m, m) for m in (args.model or [])]
        if not models:
            models.append(("tiny-random", build_tiny_random(Path(tmp) / "tiny-random")))
            if REAL_TINY.exists():
                models.append(("qalign-tiny", "qalign-tiny"))
            else:
                print(f"note: {REAL_TINY} is missing: the real qalign-tiny is not benchmarked", file=sys.stderr)
        for label, model in models:
            rows += bench_model(label, model, args, images)
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['platform']}, Python {info['python']}, "
          f"torch {info.get('torch')}, GPU {info.get('gpu')}, load avg at start {info['load_avg_at_start']}")
    print(f"requests: {args.per_request} image(s) each, multipart over 127.0.0.1; phases bounded by "
          f"{args.requests} requests / {args.seconds:g} s; server --max-batch {args.max_batch} "
          f"--max-wait-ms {args.max_wait_ms:g}")
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
