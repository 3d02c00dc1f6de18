"""`qalign serve`: the real server (uvicorn on a free loopback port) with a tiny random model.

Covers scoring by multipart / base64 JSON / allowed paths (scores equal the Scorer's), 32
concurrent clients (each gets its own rows; batches really form), limits (bytes, items, pixels,
frames), malformed bodies, non-images, paths outside the root (../, symlinks), a full queue (503 +
Retry-After), timeouts (504), the load gate (/healthz vs /readyz), the CLI, and that the server
still answers after all of it. The micro-batcher is also tested on its own.
"""

from __future__ import annotations

import base64
import io
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from qalign.serve.app import STATIC_DIR, BackgroundServer, Settings, create_app  # noqa: E402
from qalign.serve.batcher import MicroBatcher, QueueFull  # noqa: E402
from tiny_model import make_image, write_images  # noqa: E402

LEVELS = ("bad", "poor", "fair", "good", "excellent")
MAX_BYTES = 2 * 1024 * 1024


# --------------------------------------------------------------------------- helpers

def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a would-be decompression bomb; no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def wait_ready(client, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"server not ready after {timeout} s: {client.get('/readyz').json()}")


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def assert_alive(client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


class SlowBackend:
    """Wraps a backend; every model call sleeps first (a slow model for queue / timeout tests)."""

    def __init__(self, backend, delay: float):
        self.inner, self.delay, self.info = backend, delay, backend.info
        self.calls = 0

    def preprocess(self, image):
        return self.inner.preprocess(image)

    def check_task(self, task, input_kind="image"):
        return self.inner.check_task(task, input_kind)

    def level_logits(self, items, task="quality", input_kind="image"):
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.level_logits(items, task=task, input_kind=input_kind)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def layout(tmp_path_factory, image_paths):
    """root/ (allowed) with images, a sub-folder and symlinks pointing outside; outside/ with an image."""
    base = tmp_path_factory.mktemp("serve")
    root, outside = base / "root", base / "outside"
    write_images(root, 3)
    (root / "sub").mkdir()
    write_images(outside, 1)
    secret = outside / "img_000.png"
    (root / "link_out.png").symlink_to(secret)
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "notes.txt").write_text("not an image\n")
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")  # opening it for reading would block forever
    return {"root": root, "outside": outside, "secret": secret}


@pytest.fixture(scope="module")
def expected(tiny_scorer, image_paths, layout):
    """Scores computed by the Scorer directly, per file name (the reference the server must match)."""
    paths = list(image_paths) + [str(p) for p in sorted(layout["root"].glob("img_*.png"))]
    rows = tiny_scorer.score(paths)
    assert all(r.ok for r in rows)
    return {p: r for p, r in zip(paths, rows)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, layout):
    settings = Settings(model=str(tiny_model_dir), device="cpu", allowed_root=str(layout["root"]),
                        max_request_bytes=MAX_BYTES, max_items=8, max_queue=128, max_pixels=200 * 200,
                        max_frames=4, max_batch=16, max_wait_ms=20, timeout_s=60)
    with BackgroundServer(create_app(settings)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            wait_ready(client)
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
        assert_alive(c)  # after every test, whatever it sent


def upload(path, name=None, ctype="image/png"):
    return ("file", (name or Path(path).name, Path(path).read_bytes(), ctype))


def check_row(row, reference) -> None:
    assert row["error"] is None and row["error_code"] is None, row
    assert row["score_1_5"] == pytest.approx(reference.score, abs=1e-5)
    assert row["score_0_1"] == pytest.approx((row["score_1_5"] - 1) / 4, abs=1e-12)
    probs = [row["probs"][w] for w in LEVELS]
    assert probs == pytest.approx(list(reference.probs), abs=1e-5)
    assert sum(probs) == pytest.approx(1.0, abs=1e-6)
    assert row["level"] == LEVELS[int(np.argmax(probs))] == reference.level


# --------------------------------------------------------------------------- scoring

def test_multipart_scores_match_the_scorer(client, image_paths, expected):
    picks = image_paths[:3]
    r = client.post("/v1/score", files=[upload(p) for p in picks])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["score_ranges"] == {"score_1_5": [1.0, 5.0], "score_0_1": [0.0, 1.0]}
    assert body["levels"] == list(LEVELS) and body["task"] == "quality"
    assert (body["ok"], body["failed"]) == (3, 0)
    assert [row["name"] for row in body["results"]] == [Path(p).name for p in picks]
    for row, path in zip(body["results"], picks):
        assert row["kind"] == "image" and row["frames"] == 1
        check_row(row, expected[path])
    # different images really get different scores (the model reads the pixels)
    assert len({round(row["score_1_5"], 6) for row in body["results"]}) == 3


def test_json_base64_and_data_urls(client, image_paths, expected):
    raw = [Path(p).read_bytes() for p in image_paths[3:5]]
    images = [base64.b64encode(raw[0]).decode(),
              {"name": "second.png", "data": "data:image/png;base64," + base64.b64encode(raw[1]).decode()},
              "!!! not base64 !!!"]
    r = client.post("/v1/score", json={"images": images, "task": "quality"})
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    check_row(rows[0], expected[image_paths[3]])
    assert rows[1]["name"] == "second.png"
    check_row(rows[1], expected[image_paths[4]])
    assert rows[2]["error_code"] == "bad_base64" and rows[2]["score_1_5"] is None


def test_paths_under_the_allowed_root(client, layout, expected):
    root = layout["root"]
    paths = ["img_000.png", str(root / "img_001.png"), "sub/../img_002.png", "missing.png", "notes.txt", "sub", "."]
    if (root / "pipe.png").exists():
        paths.append("pipe.png")
    r = client.post("/v1/score", json={"paths": paths})
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [row["name"] for row in rows] == paths
    for row, name in zip(rows[:3], ["img_000.png", "img_001.png", "img_002.png"]):
        check_row(row, expected[str(root / name)])
    assert rows[3]["error_code"] == "no_such_file"
    assert rows[4]["error_code"] == "not_media"
    assert rows[5]["error_code"] == rows[6]["error_code"] == "not_media"  # folders
    if len(rows) > 7:
        assert rows[7]["error_code"] == "not_media" and "regular file" in rows[7]["error"]
    assert str(root) not in rows[3]["error"]  # errors name what the client sent


@pytest.mark.parametrize("make_path", [
    lambda L: str(L["secret"]),                       # absolute, outside
    lambda L: "../outside/img_000.png",               # ../ escape
    lambda L: str(L["root"] / ".." / "outside" / "img_000.png"),
    lambda L: "link_out.png",                         # symlinked file pointing outside
    lambda L: "linkdir/img_000.png",                  # symlinked folder pointing outside
    lambda L: "/etc/passwd",
], ids=["absolute", "dotdot", "absolute-dotdot", "symlink-file", "symlink-dir", "etc-passwd"])
def test_paths_outside_the_root_are_forbidden(client, server, layout, make_path):
    stats_before = client.get("/v1/stats").json()["items"]
    # a good path in the same request is not scored either: the whole request is refused
    sent = make_path(layout)
    r = client.post("/v1/score", json={"paths": ["img_000.png", sent]})
    body = assert_error(r, 403, "path_forbidden")
    if str(layout["outside"]) not in sent:  # a symlink's target is not revealed
        assert str(layout["outside"]) not in body["error"]["message"]
    assert client.get("/v1/stats").json()["items"] == stats_before


def test_paths_are_disabled_without_a_root(tiny_scorer, layout):
    settings = Settings(model="x", max_items=4, max_queue=8)
    with BackgroundServer(create_app(settings, loader=lambda s: tiny_scorer)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_ready(c)
        assert_error(c.post("/v1/score", json={"paths": [str(layout["root"] / "img_000.png")]}), 403, "paths_disabled")
        assert c.get("/v1/models").json()["limits"]["paths"] is False
        assert_alive(c)


def test_32_concurrent_clients_get_their_own_rows(client, server, image_paths, expected):
    n = 32
    before = client.get("/v1/stats").json()
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(k: int) -> None:
        picks = [image_paths[k % 16], image_paths[(k * 7 + 3) % 16]]
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            r = c.post("/v1/score", files=[upload(p) for p in picks])
            results[k] = (picks, r.status_code, r.json())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for picks, status, body in results:
        assert status == 200, body
        assert [row["name"] for row in body["results"]] == [Path(p).name for p in picks]
        for row, path in zip(body["results"], picks):
            check_row(row, expected[path])
    after = client.get("/v1/stats").json()
    assert after["items"] - before["items"] == 2 * n
    batches = after["batches"] - before["batches"]
    # fewer model calls than requests: items of different requests shared model calls
    assert batches < n, f"no micro-batching across requests: {batches} model calls for {n} requests"


# --------------------------------------------------------------------------- limits and bad input

def test_oversized_upload_is_413(client):
    blob = os.urandom(MAX_BYTES + 100_000)
    r = client.post("/v1/score", files=[("file", ("big.png", blob, "image/png"))])
    body = assert_error(r, 413, "request_too_large")
    assert f"{MAX_BYTES:,}" in body["error"]["message"]

    def chunks():  # no Content-Length: the cap must hold while streaming
        for _ in range(40):
            yield b"x" * 64 * 1024

    r = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "request_too_large")


def test_too_many_items_is_413(client, image_paths):
    assert_error(client.post("/v1/score", files=[upload(p) for p in image_paths[:9]]), 413, "too_many_items")
    b64 = base64.b64encode(Path(image_paths[0]).read_bytes()).decode()
    assert_error(client.post("/v1/score", json={"images": [b64] * 9}), 413, "too_many_items")


@pytest.mark.parametrize("content,ctype,status,code", [
    (b"--xx\r\nbroken", "multipart/form-data", 400, "malformed_multipart"),           # no boundary
    (b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nabc",
     "multipart/form-data; boundary=xx", None, None),                                   # truncated part
    (b"\x00\xff garbage", "multipart/form-data; boundary=zz", None, None),
    (b"{\"images\": [", "application/json", 400, "malformed_json"),
    (b"\xff\xfe\x00", "application/json", 400, "malformed_json"),
    (b"[1, 2]", "application/json", 422, "invalid_request"),
    (b"{\"image\": []}", "application/json", 422, "unknown_field"),
    (b"{\"images\": \"abc\"}", "application/json", 422, "invalid_request"),
    (b"{}", "application/json", 422, "no_inputs"),
    (b"{\"images\": [\"aGk=\"], \"video_fps\": \"fast\"}", "application/json", 422, "invalid_option"),
    (b"hello", "text/plain", 415, "unsupported_media_type"),
], ids=["multipart-no-boundary", "multipart-truncated", "multipart-garbage", "json-truncated", "json-binary",
        "json-list", "json-unknown-key", "json-images-not-list", "json-empty", "json-bad-option", "text-plain"])
def test_malformed_requests_get_json_errors(client, content, ctype, status, code):
    r = client.post("/v1/score", content=content, headers={"content-type": ctype})
    if status is None:  # parser-dependent: refused as malformed or as empty, never a 500
        assert r.status_code in (400, 422), r.text
        assert "error" in r.json() or r.json()["failed"] == r.json()["results"].__len__()
    else:
        assert_error(r, status, code)


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/score"), 405, "method_not_allowed")


def test_a_bad_item_fails_only_itself(client, image_paths, expected, tmp_path):
    good = image_paths[5]
    truncated = Path(good).read_bytes()[:60]
    files = [("file", ("notes.txt", b"just some text\n" * 10, "text/plain")), upload(good),
             ("file", ("cut.png", truncated, "image/png")), ("file", ("empty.jpg", b"", "image/jpeg")),
             ("file", (None, b"no name", "application/octet-stream"))]
    r = client.post("/v1/score", files=files)
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert rows[0]["error_code"] == "not_media" and "notes.txt" in rows[0]["error"]
    check_row(rows[1], expected[good])
    assert rows[2]["error_code"] == "bad_image" and rows[2]["error"].startswith("cut.png")
    assert rows[3]["error_code"] == "empty"
    assert rows[4]["error"] is not None
    for row in rows:  # the server's temp paths never leak
        assert "qalign-serve-" not in (row["error"] or "")
    assert (r.json()["ok"], r.json()["failed"]) == (1, 4)


def test_only_bad_items_is_422_with_rows(client):
    r = client.post("/v1/score", files=[("file", ("a.txt", b"hello", "text/plain"))])
    assert r.status_code == 422
    assert r.json()["results"][0]["error_code"] == "not_media"


def test_text_field_named_file_fails_its_item(client, image_paths, expected):
    r = client.post("/v1/score", files=[upload(image_paths[0])], data={"file": "not a file"})
    assert r.status_code == 200
    codes = sorted(str(row["error_code"]) for row in r.json()["results"])
    assert codes == ["None", "not_a_file"]


def test_pickle_is_never_loaded(client, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil())
    for name in ("model.pkl", "image.png", "clip.mp4"):
        r = client.post("/v1/score", files=[("file", (name, payload, "application/octet-stream"))])
        assert r.status_code == 422 and r.json()["results"][0]["error"], r.text
    time.sleep(0.2)
    assert not marker.exists()


def test_max_pixels_fails_the_item(client, image_paths, expected):
    big = png_bytes(make_image(3, size=(300, 300)))  # 90,000 px > 40,000
    bomb = fake_png_header(100_000, 100_000)
    r = client.post("/v1/score", files=[("file", ("big.png", big, "image/png")), upload(image_paths[2]),
                                         ("file", ("bomb.png", bomb, "image/png"))])
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert rows[0]["error_code"] == "too_many_pixels" and "40,000" in rows[0]["error"]
    check_row(rows[1], expected[image_paths[2]])
    assert rows[2]["error_code"] == "too_many_pixels"


def test_unsupported_task_is_422(client, image_paths):
    body = assert_error(client.post("/v1/score?task=aesthetics", files=[upload(image_paths[0])]), 422,
                        "unsupported_task")
    assert "aesthetics" in body["error"]["message"]
    assert_error(client.post("/v1/score", files=[upload(image_paths[0])], data={"task": "vibes"}), 422,
                 "unsupported_task")


def test_video_is_sampled_and_capped(client, tiny_scorer, tmp_path):
    av = pytest.importorskip("av")
    from videos import encoder_available, write_video

    codec = next((c for c in ("libx264", "mpeg4", "mjpeg") if encoder_available(c)), None)
    if codec is None:
        pytest.skip("no video encoder in this PyAV build")
    clip = tmp_path / "clip.mp4" if codec != "mjpeg" else tmp_path / "clip.avi"
    write_video(clip, duration=6.0, fps=5, size=(64, 48), codec=codec)
    data = clip.read_bytes()
    # named .png: the content decides that it is a video
    r = client.post("/v1/score", files=[("file", ("clip.png", data, "application/octet-stream"))])
    assert r.status_code == 200, r.text
    row = r.json()["results"][0]
    assert row["kind"] == "video" and row["frames"] == 4  # 6 s at 1 fps = 6 frames, capped by --max-frames 4

    # the same number as the Scorer (and `qalign score`) gives for the file
    from qalign.scoring import Scorer, VideoOptions

    reference = Scorer(tiny_scorer.backend, video=VideoOptions(max_frames=4)).score([str(clip)])[0]
    assert reference.ok and reference.kind == "video" and reference.frames == 4
    assert row["score_1_5"] == pytest.approx(reference.score, abs=1e-5)
    assert [row["probs"][w] for w in LEVELS] == pytest.approx(list(reference.probs), abs=1e-5)
    assert [f["score_1_5"] for f in row["per_frame"]] == pytest.approx([f.score for f in reference.per_frame], abs=1e-5)
    times = [f["time"] for f in row["per_frame"]]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 6.0  # seconds into the clip

    r = client.post("/v1/score", files=[("file", ("clip.mp4", data, "video/mp4"))], data={"video_frames": "2"})
    assert r.json()["results"][0]["frames"] == 2
    assert_error(client.post("/v1/score", files=[("file", ("clip.mp4", data, "video/mp4"))],
                             data={"video_frames": "9"}), 422, "invalid_option")
    cut = client.post("/v1/score", files=[("file", ("cut.mp4", data[: len(data) // 8], "video/mp4"))])
    assert cut.json()["results"][0]["error"] or cut.json()["results"][0]["warnings"]


# --------------------------------------------------------------------------- queue, timeout, load gate

def test_full_queue_answers_503_with_retry_after(tiny_scorer, image_paths):
    slow = SlowBackend(tiny_scorer.backend, delay=0.4)
    settings = Settings(model="slow", max_queue=2, max_items=2, max_batch=1, max_wait_ms=0, timeout_s=30)
    with BackgroundServer(create_app(settings, loader=lambda s: slow)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_ready(c)
        n = 12
        barrier = threading.Barrier(n)
        out: list = [None] * n

        def worker(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as cc:
                barrier.wait()
                out[k] = cc.post("/v1/score", files=[upload(image_paths[k])])

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        busy = [r for r in out if r.status_code == 503]
        done = [r for r in out if r.status_code == 200]
        assert len(busy) + len(done) == n, [r.status_code for r in out]
        assert busy and done, [r.status_code for r in out]
        for r in busy:
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        assert c.get("/v1/stats").json()["rejected_items"] == len(busy)
        assert_alive(c)
        assert c.post("/v1/score", files=[upload(image_paths[0])]).status_code == 200  # drained: serving again


def test_slow_request_times_out_with_504(tiny_scorer, image_paths):
    slow = SlowBackend(tiny_scorer.backend, delay=1.0)
    settings = Settings(model="slow", max_queue=8, max_items=4, timeout_s=0.3)
    with BackgroundServer(create_app(settings, loader=lambda s: slow)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_ready(c)
        t0 = time.monotonic()
        assert_error(c.post("/v1/score", files=[upload(image_paths[0])]), 504, "timeout")
        assert time.monotonic() - t0 < 1.0
        assert_alive(c)


def test_healthz_answers_at_once_and_readyz_waits_for_the_model(tiny_scorer, image_paths):
    gate = threading.Event()

    def loader(settings):
        assert gate.wait(30)
        return tiny_scorer

    with BackgroundServer(create_app(Settings(model="gated"), loader=loader)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        assert_alive(c)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/score", files=[upload(image_paths[0])])
        assert_error(r, 503, "model_loading")
        assert r.headers["retry-after"] == "1"
        assert c.get("/v1/models").json()["data"][0]["ready"] is False
        gate.set()
        wait_ready(c, 30)
        assert c.get("/v1/models").json()["data"][0]["ready"] is True
        assert c.post("/v1/score", files=[upload(image_paths[0])]).status_code == 200


def test_failed_load_keeps_healthz_and_reports_on_readyz():
    def loader(settings):
        raise FileNotFoundError("no weights here")

    with BackgroundServer(create_app(Settings(model="broken"), loader=loader)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        end = time.monotonic() + 10
        while c.get("/readyz").json()["status"] == "loading" and time.monotonic() < end:
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "no weights here" in r.json()["error"]
        assert_error(c.post("/v1/score", json={"images": ["aGk="]}), 503, "model_failed")
        assert_alive(c)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max-items"):
        Settings(max_items=10, max_queue=5).validate()
    with pytest.raises(ValueError, match="allowed-root"):
        Settings(allowed_root="/definitely/not/here").validate()
    with pytest.raises(ValueError, match="max-batch"):
        Settings(max_batch=0).validate()


# --------------------------------------------------------------------------- schema and page

def test_models_openapi_and_page(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["ready"] is True and models["data"][0]["tasks"] == ["quality"]
    assert models["levels"] == list(LEVELS) and models["limits"]["max_items"] == 8
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert {"/healthz", "/readyz", "/v1/models"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="files"' in page.text
    for f in STATIC_DIR.iterdir():  # offline: no external assets
        text = client.get(f"/static/{f.name}").text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


# --------------------------------------------------------------------------- the CLI

def test_cli_serve_subprocess(tiny_model_dir, image_paths, expected, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qalign", "serve", "--model", str(tiny_model_dir), "--port", "0",
                             "--device", "cpu", "--log-level", "warning", "--max-items", "4"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()  # drains the pipe
    try:
        url = None
        end = time.monotonic() + 60
        while url is None and time.monotonic() < end:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "qalign serve exited"
                continue
            if "listening on " in line:
                url = line.split("listening on ")[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:"), "no listening line"
        with httpx.Client(base_url=url, timeout=60) as c:
            assert_alive(c)
            wait_ready(c, 90)
            r = c.post("/v1/score", files=[upload(image_paths[7])])
            assert r.status_code == 200
            check_row(r.json()["results"][0], expected[image_paths[7]])
            assert c.get("/v1/models").json()["limits"]["max_items"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_rejects_bad_settings(capsys):
    from qalign.cli import main

    assert main(["serve", "--max-items", "10", "--max-queue", "5"]) == 2
    assert "max-items" in capsys.readouterr().err


# --------------------------------------------------------------------------- the batcher alone

def _recording_batcher(**kw):
    calls = []

    def run(key, payloads):
        calls.append((key, list(payloads)))
        return [(key, p * 10) for p in payloads]

    return MicroBatcher(run, **kw), calls


def test_batcher_groups_by_key_and_routes_results():
    b, calls = _recording_batcher(max_batch=2, max_wait_s=0, max_queue=10)
    futs = b.submit([("A", 1, 1), ("B", 2, 1), ("A", 3, 1), ("A", 4, 1), ("B", 5, 1)])
    b.start()
    assert [f.result(10) for f in futs] == [("A", 10), ("B", 20), ("A", 30), ("A", 40), ("B", 50)]
    b.close()
    assert calls == [("A", [1, 3]), ("B", [2, 5]), ("A", [4])]
    assert b.stats.as_dict()["largest_batch"] == 2


def test_batcher_costs_frames_and_fails_whole_batches_on_errors():
    b, calls = _recording_batcher(max_batch=4, max_wait_s=0, max_queue=10)
    futs = b.submit([("V", "a", 3), ("V", "b", 3), ("V", "c", 1), ("V", "big", 9)])
    b.start()
    for f in futs:
        f.result(10)
    b.close()
    assert [p for _, p in calls] == [["a", "c"], ["b"], ["big"]]

    def broken(key, payloads):
        raise RuntimeError("boom")

    b = MicroBatcher(broken, max_batch=4, max_wait_s=0).start()
    futs = b.submit([("A", 1, 1), ("A", 2, 1)])
    for f in futs:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(10)
    b.close()


def test_batcher_queue_is_bounded_all_or_nothing():
    b, _ = _recording_batcher(max_batch=1, max_queue=3)
    b.submit([("A", 1, 1), ("A", 2, 1)])
    with pytest.raises(QueueFull) as info:
        b.submit([("A", 3, 1), ("A", 4, 1)])
    assert info.value.retry_after >= 1 and b.queued == 2
    assert b.has_room(1) and not b.has_room(2)
    b.close()


def test_batcher_skips_cancelled_items_and_fails_queued_ones_on_close():
    b, calls = _recording_batcher(max_batch=8, max_wait_s=0)
    futs = b.submit([("A", 1, 1), ("A", 2, 1)])
    b.cancel(futs[:1])
    b.start()
    assert futs[1].result(10) == ("A", 20)
    assert futs[0].cancelled() and calls == [("A", [2])]
    b.close()
    b2, _ = _recording_batcher()
    left = b2.submit([("A", 1, 1)])
    b2.close()
    with pytest.raises(Exception, match="shutting down"):
        left[0].result(1)


def test_batcher_waits_only_while_requests_are_on_their_way():
    b, calls = _recording_batcher(max_batch=2, max_wait_s=5.0)
    b.start()
    t0 = time.monotonic()
    assert b.submit([("A", 1, 1)])[0].result(10) == ("A", 10)
    assert time.monotonic() - t0 < 2.0  # nobody announced: no 5 s wait for a lone item
    ticket = b.reserve()
    first = b.submit([("A", 2, 1)])
    time.sleep(0.1)
    assert not first[0].done()  # waiting for the announced request
    second = b.submit([("A", 3, 1)], ticket=ticket)
    assert first[0].result(10) == ("A", 20) and second[0].result(10) == ("A", 30)
    assert calls[-1] == ("A", [2, 3])
    b.close()


def test_result_future_is_a_concurrent_future():
    b, _ = _recording_batcher()
    fut = b.submit([("A", 1, 1)])[0]
    assert isinstance(fut, Future)
    b.close()
