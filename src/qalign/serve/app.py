"""The HTTP server: FastAPI app around one model, a micro-batcher and a static web page.

Endpoints

    POST /v1/score   multipart (field ``file``, repeatable) or JSON ({"images": [base64...]} and/or
                     {"paths": [...]} under --allowed-root); options ``task``, ``video_fps``,
                     ``video_frames`` as form fields, JSON keys or query parameters.
    GET  /v1/models  the model being served (name, tasks, video mode) and the score ranges
    GET  /v1/stats   micro-batching counters (batches, mean batch size, queue depth)
    GET  /healthz    200 while the process is alive
    GET  /readyz     200 once the model is loaded, 503 before (or when loading failed)
    GET  /           the web page (static files in ``serve/static``, no external assets)
    GET  /openapi.json, /docs   FastAPI's schema and its viewer

Flow of a scoring request: the body is read under a byte cap; each item is decoded and
preprocessed in a thread of the request side (a bounded pool), so a broken file fails only its own
item and the model thread only ever sees tensors; good items are queued in the micro-batcher keyed
by (task, image|video); each item's Future resolves with (score, probabilities) or a model error.

Safety: bodies over ``max_request_bytes`` -> 413 (by Content-Length before reading, or while
streaming); more than ``max_items`` inputs -> 413; images over ``max_pixels`` and videos with more
than ``max_pixels`` per frame fail their item; videos are sampled to at most ``max_frames`` frames;
paths only when an allowed root is configured, resolved (``..`` and symlinks) and re-checked on the
opened file descriptor; uploads are written under server-chosen names in a private temp folder;
media are decoded by Pillow / PyAV only (no pickle, nothing executed). Errors are JSON:
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
import warnings
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..levels import LEVELS, logits_to_scores
from ..media import sniff
from ..media.image import MediaError, load_image
from ..scoring import Scorer, ScoreRow
from .batcher import BatcherClosed, MicroBatcher, QueueFull

LOG = logging.getLogger("qalign.serve")
STATIC_DIR = Path(__file__).resolve().with_name("static")
MIB = 1024 * 1024

PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; script-src 'self'; "
            "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


# --------------------------------------------------------------------------- settings and errors

@dataclass
class Settings:
    """Everything ``qalign serve`` can be told; the defaults are the command's defaults."""

    model: str = "qalign-tiny"
    device: str = "auto"
    dtype: str | None = None
    allowed_root: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_request_bytes: int = 32 * MIB
    max_pixels: int = 50_000_000
    max_items: int = 64
    max_frames: int = 16
    timeout_s: float = 60.0
    decode_workers: int = field(default_factory=lambda: max(2, min(4, os.cpu_count() or 1)))

    def validate(self) -> "Settings":
        positive = ("max_batch", "max_queue", "max_request_bytes", "max_pixels", "max_items", "max_frames",
                    "decode_workers")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError("max-wait-ms must be >= 0")
        if not self.timeout_s > 0:
            raise ValueError("timeout-s must be > 0")
        if self.max_items > self.max_queue:
            raise ValueError(f"max-items ({self.max_items}) must not exceed max-queue ({self.max_queue}): "
                             "a request larger than the queue could never be admitted")
        if self.allowed_root is not None:
            root = Path(self.allowed_root).expanduser()
            if not root.is_dir():
                raise ValueError(f"allowed-root {self.allowed_root!r} is not a directory")
        return self

    @property
    def root(self) -> Path | None:
        return None if self.allowed_root is None else Path(os.path.realpath(Path(self.allowed_root).expanduser()))


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


class ModelFailure(str):
    """A model-side error for one item (returned by the batch runner instead of a score)."""


# --------------------------------------------------------------------------- inputs

@dataclass
class _Input:
    index: int
    name: str
    data: bytes | None = None  # upload / base64
    path: Path | None = None  # resolved, inside the allowed root
    suffix: str = ""
    error: str = ""
    code: str = ""


@dataclass
class _Decoded:
    kind: str = "unknown"
    pixels: Any = None  # tensor [F, C, H, W]
    frames: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    code: str = ""
    times: list[float] = field(default_factory=list)  # video: presentation time of each frame (s)
    indices: list[int] = field(default_factory=list)  # video: frame number of each frame


@dataclass
class _Options:
    task: str = "quality"
    video_fps: float | None = None
    video_frames: int | None = None


def _safe_suffix(filename: str) -> str:
    """The extension of a client file name, only when it is a known media extension (used by the
    content sniffer as a tie-breaker); never any other part of the name."""
    suffix = Path(filename or "").suffix.lower()
    if suffix in sniff.IMAGE_EXTENSIONS or suffix in sniff.VIDEO_EXTENSIONS:
        return suffix
    return ""


def _b64decode(text: str) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ValueError("a data: URL must be base64 (data:<type>;base64,...)")
    text = "".join(text.split()).translate(_URLSAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


_URLSAFE = str.maketrans("-_", "+/")


def resolve_under_root(raw: Any, root: Path | None) -> Path:
    """A client path -> its real path, which must lie inside ``root`` (403 otherwise)."""
    if root is None:
        raise ApiError(403, "paths_disabled", "paths are disabled on this server; start it with --allowed-root DIR "
                                              "to score files under DIR, or upload the files")
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise ApiError(422, "invalid_path", f"a path must be a non-empty string without NUL bytes, got {raw!r:.80}")
    path = Path(raw).expanduser() if raw.startswith("~") else Path(raw)
    if not path.is_absolute():
        path = root / path
    real = Path(os.path.realpath(path))  # resolves '..' and every symlink on the way
    if real != root and root not in real.parents:
        raise ApiError(403, "path_forbidden", f"path {raw!r} is outside the allowed root")
    return real


def _open_under_root(path: Path, root: Path) -> tuple[int, Path]:
    """Open ``path`` without following a final symlink and check the opened file again (a
    symlink swapped in after ``resolve_under_root`` cannot lead outside the root)."""
    # O_NONBLOCK: a FIFO under the root must not hang the thread (it is refused as not a regular file)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        proc = Path(f"/proc/self/fd/{fd}")
        if proc.exists():
            real = Path(os.readlink(proc))
            if real != root and root not in real.parents:
                raise ApiError(403, "path_forbidden", "path left the allowed root while it was opened")
            return fd, proc
        return fd, path
    except BaseException:
        os.close(fd)
        raise


def _clean(message: str, internal: str, name: str) -> str:
    """Error messages name the client's item, never the server's temp file."""
    return message.replace(internal, name) if internal else message


def decode_input(item: _Input, backend, settings: Settings, options: _Options, tmpdir: str) -> _Decoded:
    """Bytes or a path -> preprocessed frames [F, C, H, W]; every failure becomes an item error."""
    if item.error:
        return _Decoded(error=item.error, code=item.code)
    fd = None
    tmp: Path | None = None
    source = ""
    try:
        if item.path is not None:
            root = settings.root
            try:
                fd, src = _open_under_root(item.path, root)
            except ApiError as exc:
                return _Decoded(error=exc.message, code=exc.code)
            except IsADirectoryError:
                return _Decoded(error=f"{item.name}: is a directory, not a file", code="not_media")
            except FileNotFoundError:
                return _Decoded(error=f"{item.name}: no such file", code="no_such_file")
            except OSError as exc:
                return _Decoded(error=f"{item.name}: cannot open ({exc.strerror})", code="unreadable")
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                return _Decoded(error=f"{item.name}: is a directory, not a file", code="not_media")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return _Decoded(error=f"{item.name}: not a regular file", code="not_media")
        else:
            if not item.data:
                return _Decoded(error=f"{item.name}: empty file (0 bytes)", code="empty")
            tmp = Path(tmpdir) / f"{uuid.uuid4().hex}{item.suffix}"
            with open(tmp, "xb") as fh:
                fh.write(item.data)
            src = tmp
        source = str(src)
        found = sniff.detect(src)
        if found.kind == "image":
            return _decode_image(src, item.name, backend, settings, source)
        if found.kind == "video":
            return _decode_video(src, item.name, backend, settings, options, source)
        what = {"empty": "empty file (0 bytes)", "text": "a text file"}.get(found.format, f"format {found.format!r}")
        return _Decoded(error=f"{item.name}: not an image or video ({what})", code="not_media")
    except Exception as exc:  # noqa: BLE001 - a broken input never takes the server down
        return _Decoded(error=_clean(f"{item.name}: {type(exc).__name__}: {exc}", source, item.name), code="bad_input")
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _pixel_count(src: Path) -> int | None:
    """Width x height from the image header (nothing decoded); None when Pillow cannot tell."""
    try:
        from ..media.image import _open_header  # Pillow's global bomb limit lifted; our cap applies
    except ImportError:  # pragma: no cover - older media.image
        from PIL import Image

        def _open_header(path):
            return Image.open(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_header(src) as im:
                return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - load_image reports it properly
        return None


def _decode_image(src: Path, name: str, backend, settings: Settings, source: str) -> _Decoded:
    pixels = _pixel_count(src)
    if pixels is not None and pixels > settings.max_pixels:
        return _Decoded(kind="image", code="too_many_pixels",
                        error=f"{name}: image has {pixels:,} pixels; this server accepts at most {settings.max_pixels:,}")
    try:
        image = load_image(src, max_pixels=settings.max_pixels)
    except MediaError as exc:
        return _Decoded(kind="image", error=_clean(str(exc), source, name), code="bad_image")
    return _Decoded("image", backend.preprocess(image)[None], 1)


def _decode_video(src: Path, name: str, backend, settings: Settings, options: _Options, source: str) -> _Decoded:
    """Frames streamed one at a time into the preprocessor (as the Scorer does): memory is bounded
    by --max-frames, whatever the length of the video."""
    if getattr(backend.info, "video", "per-frame") == "no":
        return _Decoded(kind="video", error=f"{name}: model {backend.info.name!r} does not score video", code="video_unsupported")
    try:
        from ..media import video
        if video.av is None:
            raise ImportError("video support needs PyAV: pip install 'qalign[video]' (or: pip install av)")
    except ImportError as exc:
        return _Decoded(kind="video", error=f"{name}: {exc}", code="video_unsupported")
    import torch

    pixels, times, indices = [], [], []
    try:
        with video.read_frames(src, fps=options.video_fps, frames=options.video_frames,
                               max_frames=settings.max_frames) as stream:
            size = stream.info.width * stream.info.height
            if size > settings.max_pixels:
                return _Decoded(kind="video", code="too_many_pixels",
                                error=f"{name}: video frames have {size:,} pixels; this server accepts at most "
                                      f"{settings.max_pixels:,}")
            for frame in stream:
                if len(pixels) >= settings.max_frames:
                    break
                pixels.append(backend.preprocess(frame.image))
                times.append(float(frame.time))
                indices.append(int(frame.index))
            notes = [_clean(w, source, name) for w in stream.warnings]
    except (video.VideoError, MediaError, ValueError) as exc:
        return _Decoded(kind="video", error=_clean(str(exc), source, name), code="bad_video")
    if not pixels:
        return _Decoded(kind="video", error=f"{name}: no frame could be decoded", code="bad_video")
    return _Decoded("video", torch.stack(pixels), len(pixels), notes, times=times, indices=indices)


# --------------------------------------------------------------------------- server state

def default_loader(settings: Settings):
    from ..models.registry import load_scorer

    return load_scorer(settings.model, device=settings.device, dtype=settings.dtype)


class ServerState:
    """The model, its batcher and the load status, shared by the request handlers."""

    def __init__(self, settings: Settings, loader: Callable[[Settings], Any] | None = None,
                 on_load_failure: Callable[[BaseException], None] | None = None):
        self.settings = settings
        self.loader = loader or default_loader
        self.on_load_failure = on_load_failure
        self.status = "loading"
        self.error = ""
        self.backend = None
        self.batcher: MicroBatcher | None = None
        self.tmpdir = ""
        self.decode_limiter = None
        self.started = time.time()
        self.loaded_in_s: float | None = None
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="qalign-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            loaded = self.loader(self.settings)
            backend = loaded.backend if isinstance(loaded, Scorer) else loaded
            self._warm_up(backend)
            s = self.settings
            batcher = MicroBatcher(self._run_batch, max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000.0,
                                   max_queue=s.max_queue).start()
            self.backend, self.batcher = backend, batcher
            self.loaded_in_s = round(time.monotonic() - started, 3)
            self.status = "ready"
            LOG.info("model %s ready in %.1f s", backend.info.name, self.loaded_in_s)
        except BaseException as exc:  # noqa: BLE001
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            LOG.error("model %r failed to load: %s", self.settings.model, self.error)
            if self.on_load_failure is not None:
                self.on_load_failure(exc)

    @staticmethod
    def _warm_up(backend) -> None:
        """One forward pass before the first request (lazy inits, allocator, prompt caches)."""
        from PIL import Image

        task = backend.info.tasks[0] if backend.info.tasks else "quality"
        backend.level_logits([backend.preprocess(Image.new("RGB", (64, 64), (128, 128, 128)))[None]], task=task)

    def _run_batch(self, key, payloads: list) -> list:
        """On the model thread: tensors -> the five level logits per item; a failing item fails alone."""
        task, kind = key
        try:
            logits = self.backend.level_logits(payloads, task=task, input_kind=kind)
            logits = logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits
            logits = np.asarray(logits, dtype=np.float64).reshape(len(payloads), len(LEVELS))
        except Exception as exc:  # noqa: BLE001
            if len(payloads) == 1:
                return [ModelFailure(f"model failed: {type(exc).__name__}: {exc}")]
            return [r for p in payloads for r in self._run_batch(key, [p])]
        return list(logits)

    def jobs_for(self, task: str, decoded: _Decoded) -> list[tuple]:
        """Batcher jobs of one decoded item: an image is one job; a video is one job for a backend
        trained on video ("native"), else one image job per frame (scored as images and averaged,
        as the Scorer does), so frames share batches with other requests' images."""
        if decoded.kind == "video" and self.backend.info.video != "native":
            return [((task, "image"), decoded.pixels[i:i + 1], 1) for i in range(decoded.frames)]
        return [((task, decoded.kind), decoded.pixels, decoded.frames)]

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def model_info(self) -> dict:
        b = self.backend
        if b is None:
            return {"id": self.settings.model, "ready": False, "status": self.status}
        info = b.info
        return {"id": info.name, "ready": self.ready, "status": self.status, "tasks": list(info.tasks),
                "refused_tasks": dict(info.refusals), "video": info.video, "description": info.description,
                "device": str(getattr(b, "device", "")), "dtype": str(getattr(b, "dtype", "")).replace("torch.", "")}


# --------------------------------------------------------------------------- ASGI guard

class _Guard:
    """Outer ASGI layer: the request-size cap (by Content-Length and while streaming) and
    security headers on every response (plus a strict CSP on the web page)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, seen: int | None = None) -> ApiError:
        size = f" of {seen:,} bytes" if seen is not None else ""
        return ApiError(413, "request_too_large", f"request body{size} exceeds this server's limit of "
                                                  f"{self.max_bytes:,} bytes (--max-request-bytes)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/static/")

        async def send_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if page:
                    headers += [(b"content-security-policy", PAGE_CSP.encode()), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        length = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None and length > self.max_bytes:
            exc = self._too_large(length)
            response = JSONResponse(error_body(exc.code, exc.message), status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send_headers)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send_headers)


# --------------------------------------------------------------------------- request parsing

def _parse_options(values: dict[str, Any]) -> _Options:
    opts = _Options()
    task = values.get("task")
    if task is not None:
        if not isinstance(task, str):
            raise ApiError(422, "invalid_option", "task must be a string")
        opts.task = task
    fps = values.get("video_fps")
    if fps is not None and fps != "":
        try:
            opts.video_fps = float(fps)
        except (TypeError, ValueError):
            raise ApiError(422, "invalid_option", f"video_fps must be a number, got {fps!r:.40}") from None
        if not (0 < opts.video_fps <= 60):
            raise ApiError(422, "invalid_option", "video_fps must be in (0, 60]")
    frames = values.get("video_frames")
    if frames is not None and frames != "":
        try:
            opts.video_frames = int(frames)
        except (TypeError, ValueError):
            raise ApiError(422, "invalid_option", f"video_frames must be an integer, got {frames!r:.40}") from None
    if opts.video_fps is not None and opts.video_frames is not None:
        raise ApiError(422, "invalid_option", "give video_fps or video_frames, not both")
    return opts


async def _read_multipart(request, settings: Settings) -> tuple[list[_Input], dict]:
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=settings.max_items, max_fields=32, max_part_size=64 * 1024)
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if "Too many files" in detail:
            raise ApiError(413, "too_many_items", f"more than {settings.max_items} files in one request "
                                                  "(--max-items)") from None
        raise ApiError(400, "malformed_multipart", f"malformed multipart body: {detail}") from None
    try:
        unknown = sorted(set(form.keys()) - {"file", "task", "video_fps", "video_frames"})
        if unknown:
            raise ApiError(422, "unknown_field", f"unknown form field(s) {unknown}; files go in field 'file'")
        items = []
        for i, value in enumerate(form.getlist("file")):
            if isinstance(value, UploadFile):
                name = value.filename or f"file {i}"
                items.append(_Input(i, name, data=await value.read(), suffix=_safe_suffix(name)))
            else:
                items.append(_Input(i, f"field {i}", error=f"field 'file' #{i} is text, not an uploaded file",
                                    code="not_a_file"))
        options = {k: form.get(k) for k in ("task", "video_fps", "video_frames") if form.get(k) is not None}
        for k, v in options.items():
            if not isinstance(v, str):
                raise ApiError(422, "invalid_option", f"form field {k!r} must be text, not a file")
        return items, options
    finally:
        await form.close()


def _read_json(body: bytes, settings: Settings) -> tuple[list[_Input], dict]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", 'the JSON body must be an object: {"images": [...]} or {"paths": [...]}')
    unknown = sorted(set(data) - {"images", "paths", "task", "video_fps", "video_frames"})
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown key(s) {unknown}; expected images, paths, task, video_fps, video_frames")
    images, paths = data.get("images", []), data.get("paths", [])
    if not isinstance(images, list) or not isinstance(paths, list):
        raise ApiError(422, "invalid_request", "'images' and 'paths' must be lists")
    if len(images) + len(paths) > settings.max_items:
        raise ApiError(413, "too_many_items", f"{len(images) + len(paths)} inputs in one request; this server "
                                              f"accepts at most {settings.max_items} (--max-items)")
    items: list[_Input] = []
    for i, entry in enumerate(images):
        name, text = f"image {i}", entry
        if isinstance(entry, dict) and set(entry) <= {"name", "data"}:
            name = str(entry.get("name") or name)[:200]
            text = entry.get("data")
        if not isinstance(text, str):
            items.append(_Input(len(items), name, error=f"{name}: expected a base64 string or "
                                                        '{"name": ..., "data": <base64>}', code="invalid_item"))
            continue
        try:
            items.append(_Input(len(items), name, data=_b64decode(text), suffix=_safe_suffix(name)))
        except ValueError as exc:
            items.append(_Input(len(items), name, error=f"{name}: {exc}", code="bad_base64"))
    root = settings.root
    for raw in paths:
        real = resolve_under_root(raw, root)  # 403 for the whole request: nothing is scored
        items.append(_Input(len(items), raw, path=real))
    options = {k: data[k] for k in ("task", "video_fps", "video_frames") if k in data}
    return items, options


# --------------------------------------------------------------------------- the app

SCORE_REQUEST_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                             "description": "images or videos (repeat the field for several)"},
                    "task": {"type": "string", "enum": ["quality", "aesthetics"], "default": "quality"},
                    "video_fps": {"type": "number", "description": "frames per second to sample (default 1)"},
                    "video_frames": {"type": "integer", "description": "sample N evenly spaced frames instead"},
                },
                "required": ["file"],
            }},
            "application/json": {"schema": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "images": {"type": "array", "description": "base64 (or data: URL) strings, or {name, data}",
                               "items": {"oneOf": [{"type": "string"}, {"type": "object", "properties": {
                                   "name": {"type": "string"}, "data": {"type": "string"}}}]}},
                    "paths": {"type": "array", "items": {"type": "string"},
                              "description": "files under the server's --allowed-root (relative to it or absolute)"},
                    "task": {"type": "string", "enum": ["quality", "aesthetics"], "default": "quality"},
                    "video_fps": {"type": "number"},
                    "video_frames": {"type": "integer"},
                },
            }},
        },
    },
}


def _score_response_models():
    from pydantic import BaseModel, Field

    class LevelProbs(BaseModel):
        bad: float
        poor: float
        fair: float
        good: float
        excellent: float

    class ItemResult(BaseModel):
        index: int
        name: str
        kind: str = Field(description="image or video (decided by the content, not the name)")
        frames: int
        score_1_5: float | None = Field(description="score on [1, 5]: bad = 1 ... excellent = 5")
        score_0_1: float | None = Field(description="the same score on [0, 1]: (score_1_5 - 1) / 4")
        level: str | None = Field(description="most probable level word")
        probs: LevelProbs | None
        error: str | None
        error_code: str | None
        warnings: list[str]
        per_frame: list[dict] | None = Field(None, description="videos scored frame by frame: index, time (s), "
                                                                "score_1_5 and level of each sampled frame")

    class ScoreResponse(BaseModel):
        model: str
        task: str
        score_ranges: dict[str, list[float]]
        levels: list[str]
        results: list[ItemResult]
        ok: int
        failed: int
        elapsed_ms: float

    class ErrorDetail(BaseModel):
        code: str
        message: str

    class ErrorResponse(BaseModel):
        error: ErrorDetail

    return ScoreResponse, ErrorResponse


def create_app(settings: Settings | None = None, loader: Callable[[Settings], Any] | None = None,
               on_load_failure: Callable[[BaseException], None] | None = None):
    """The FastAPI app. ``loader(settings)`` returns a Scorer (or a Backend); by default it is
    ``load_scorer(settings.model, ...)``, run in a background thread at startup."""
    from .. import __version__

    settings = (settings or Settings()).validate()
    state = ServerState(settings, loader, on_load_failure)

    @asynccontextmanager
    async def lifespan(app):
        state.tmpdir = tempfile.mkdtemp(prefix="qalign-serve-")
        state.decode_limiter = anyio.CapacityLimiter(settings.decode_workers)
        state.start_loading()
        try:
            yield
        finally:
            state.shutdown()

    app = FastAPI(title="qalign", version=__version__, lifespan=lifespan,
                  description="Q-Align image/video quality scores over HTTP. Scores are on [1, 5] (bad = 1, "
                              "excellent = 5); score_0_1 = (score_1_5 - 1) / 4.")
    app.state.qalign = state
    app.add_middleware(_Guard, max_bytes=settings.max_request_bytes)
    ScoreResponse, ErrorResponse = _score_response_models()
    error_docs = {code: {"model": ErrorResponse} for code in (400, 403, 413, 415, 422, 503, 504)}

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(error_body("invalid_request", str(exc.errors())[:500]), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        LOG.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal_error", f"{type(exc).__name__}: {exc}"[:500]), status_code=500)

    @app.get("/healthz", summary="liveness: 200 while the process answers")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - state.started, 1)}

    @app.get("/readyz", summary="readiness: 200 once the model is loaded, 503 before or after a failed load",
             responses={503: {"description": "model loading or failed"}})
    async def readyz():
        body = {"status": state.status, "model": settings.model}
        if state.ready:
            body["loaded_in_s"] = state.loaded_in_s
            return body
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"} if state.status == "loading" else None)

    @app.get("/v1/models", summary="the model this server scores with")
    async def models():
        return {"data": [state.model_info()], "levels": list(LEVELS),
                "score_ranges": {"score_1_5": [1.0, 5.0], "score_0_1": [0.0, 1.0]},
                "limits": {"max_items": settings.max_items, "max_request_bytes": settings.max_request_bytes,
                           "max_pixels": settings.max_pixels, "max_frames": settings.max_frames,
                           "paths": settings.allowed_root is not None}}

    @app.get("/v1/stats", summary="micro-batching counters")
    async def stats():
        b = state.batcher
        return {"status": state.status, "queued": b.queued if b else 0, "max_queue": settings.max_queue,
                "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                **(b.stats.as_dict() if b else {})}

    @app.post("/v1/score", summary="score images or videos", openapi_extra=SCORE_REQUEST_DOC,
              responses={200: {"model": ScoreResponse, "description": "one result per input, in order"},
                         **error_docs})
    async def score(request: Request):
        started = time.monotonic()
        if not state.ready:
            if state.status == "failed":
                raise ApiError(503, "model_failed", f"the model failed to load: {state.error}")
            raise ApiError(503, "model_loading", "the model is still loading; retry shortly", {"Retry-After": "1"})
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            items, raw_opts = await _read_multipart(request, settings)
        elif ctype == "application/json" or ctype.endswith("+json"):
            items, raw_opts = _read_json(await request.body(), settings)
        else:
            raise ApiError(415, "unsupported_media_type",
                           "send multipart/form-data (field 'file') or application/json ({\"images\": [...]})")
        options = _parse_options({**dict(request.query_params), **raw_opts})
        if not items:
            raise ApiError(422, "no_inputs", "no inputs: send files in field 'file', or JSON 'images' / 'paths'")
        if len(items) > settings.max_items:
            raise ApiError(413, "too_many_items", f"{len(items)} inputs in one request; this server accepts at most "
                                                  f"{settings.max_items} (--max-items)")
        if options.video_frames is not None and not (1 <= options.video_frames <= settings.max_frames):
            raise ApiError(422, "invalid_option", f"video_frames must be in [1, {settings.max_frames}] (--max-frames)")
        backend, batcher = state.backend, state.batcher
        try:
            backend.check_task(options.task)
        except ValueError as exc:  # UnsupportedTask is a ValueError
            raise ApiError(422, "unsupported_task", str(exc)) from None
        if not batcher.has_room(len(items)):
            exc = batcher.reject(len(items))
            raise ApiError(503, "queue_full", str(exc), {"Retry-After": str(exc.retry_after)})

        deadline = started + settings.timeout_s
        with batcher.reserve() as ticket:
            decoded = await asyncio.gather(*[
                anyio.to_thread.run_sync(decode_input, item, backend, settings, options, state.tmpdir,
                                         limiter=state.decode_limiter)
                for item in items])
            good = [i for i, d in enumerate(decoded) if not d.error]
            jobs = {i: state.jobs_for(options.task, decoded[i]) for i in good}
            try:
                futures = batcher.submit([job for i in good for job in jobs[i]], ticket=ticket) if good else []
            except QueueFull as exc:
                raise ApiError(503, "queue_full", str(exc), {"Retry-After": str(exc.retry_after)}) from None
            except BatcherClosed as exc:
                raise ApiError(503, "shutting_down", str(exc)) from None
        outcomes = await _wait(futures, deadline - time.monotonic())
        if outcomes is None:
            batcher.cancel(futures)
            raise ApiError(504, "timeout", f"scoring did not finish within {settings.timeout_s:g} s (--timeout-s)")

        by_index, position = {}, 0
        for i in good:
            by_index[i] = outcomes[position:position + len(jobs[i])]
            position += len(jobs[i])
        results = [_result_row(i, item.name, d, by_index.get(i, [])) for i, (item, d) in enumerate(zip(items, decoded))]
        ok = sum(r["error"] is None for r in results)
        body = {"model": backend.info.name, "task": options.task,
                "score_ranges": {"score_1_5": [1.0, 5.0], "score_0_1": [0.0, 1.0]}, "levels": list(LEVELS),
                "results": results, "ok": ok, "failed": len(results) - ok,
                "elapsed_ms": round((time.monotonic() - started) * 1000.0, 2)}
        # Every item failed on its input: the request as a whole is unprocessable.
        return JSONResponse(body, status_code=200 if ok else 422)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _wait(futures: list[Future], timeout: float) -> list | None:
    """Outcomes of the batcher's Futures (result or exception), or None on timeout."""
    if not futures:
        return []
    wrapped = [asyncio.wrap_future(f) for f in futures]
    done, pending = await asyncio.wait(wrapped, timeout=max(timeout, 0.0))
    if pending:
        for w in pending:
            w.cancel()
        return None
    return [w.exception() if w.exception() is not None else w.result() for w in wrapped]


def _result_row(index: int, name: str, decoded: _Decoded, outcomes: list) -> dict:
    """One item's JSON row from its decode result and its jobs' outcomes (logits or errors)."""
    row = {"index": index, "name": name, "kind": decoded.kind, "frames": decoded.frames, "score_1_5": None,
           "score_0_1": None, "level": None, "probs": None, "error": None, "error_code": None,
           "warnings": list(decoded.warnings)}
    if decoded.error:
        row.update(error=decoded.error, error_code=decoded.code or "bad_input")
        return row
    failure = next((o for o in outcomes if isinstance(o, (ModelFailure, BaseException))), None)
    if failure is not None or not outcomes:
        code = "shutting_down" if isinstance(failure, BatcherClosed) else "model_failed"
        text = failure if isinstance(failure, ModelFailure) else f"{type(failure).__name__}: {failure}"
        row.update(error=f"{name}: {text}", error_code=code)
        return row
    logits = np.stack(outcomes)
    probs, scores = logits_to_scores(logits.mean(0, keepdims=True))  # per-frame video: mean of frame logits
    shared = ScoreRow(name, float(scores[0]), tuple(float(x) for x in probs[0]), kind=decoded.kind,
                      frames=decoded.frames)
    row.update(score_1_5=shared.score, score_0_1=shared.score_0_1, level=shared.level,
               probs=dict(zip(LEVELS, shared.probs)))
    if decoded.kind == "video" and len(outcomes) > 1:
        frame_probs, frame_scores = logits_to_scores(logits)
        row["per_frame"] = [{"index": i, "time": round(t, 4), "score_1_5": float(s),
                             "level": LEVELS[int(np.argmax(p))]}
                            for i, t, s, p in zip(decoded.indices, decoded.times, frame_scores, frame_probs)]
    return row


# --------------------------------------------------------------------------- running

def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int):
    """A listening TCP socket (port 0: a free port chosen by the OS)."""
    import socket

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(addr)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """uvicorn serving ``app`` in a thread on a socket of its own (tests, notebooks, benchmarks).

        with BackgroundServer(create_app(settings)) as server:
            httpx.get(server.url + "/healthz")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=30))
        self.thread = threading.Thread(target=self._run, name="qalign-serve", daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
