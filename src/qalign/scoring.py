"""The Scorer: media in, one result row per input out.

    inputs -> decode + preprocess (threads, ahead of the model) -> batches -> backend level logits
           -> close-set softmax -> score in [1, 5] (and [0, 1]) -> ScoreRow, in input order

An input is an image (path or PIL image) or a video (a path whose content is video, or a list of
PIL frames). Videos are sampled with a frame cap (``VideoOptions``) and streamed frame by frame
into the preprocessor, so memory is bounded by the cap whatever the video's length. Backends
trained on video get all frames in one prompt ("native"); the others score each frame as an
image and the level logits are averaged ("per-frame"), which also gives per-frame scores.

A bad input becomes a row with an error; the other inputs go on. All items of an image batch
share one prompt and one length, so no padding exists and a batch of 16 gives the scores of 16
batches of 1 (float32).
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .levels import LEVELS, logits_to_scores
from .media.image import DEFAULT_MAX_PIXELS, MediaError, load_image
from .models.base import Backend

PROB_FIELDS = tuple(f"p_{word}" for word in LEVELS)
ROW_FIELDS = ("path", "score_1_5", "score_0_1", *PROB_FIELDS, "error")


@dataclass(frozen=True)
class VideoOptions:
    """How videos are sampled: ``fps`` frames per second (default 1, as Q-Align) or ``frames`` N
    uniformly spaced frames (Q-ReAlign uses 8); ``max_frames`` caps the fps plan (None: no cap)."""

    fps: float | None = None
    frames: int | None = None
    max_frames: int | None = 16

    def __post_init__(self):
        # Checked here (not per video) so that a bad option fails once, before any scoring.
        if self.fps is not None and self.frames is not None:
            raise ValueError("video sampling: pass either fps or frames, not both")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"video sampling: fps must be a positive number, got {self.fps!r}")
        if self.frames is not None and (int(self.frames) != self.frames or self.frames < 1):
            raise ValueError(f"video sampling: frames must be a positive integer, got {self.frames!r}")
        if self.max_frames is not None and (int(self.max_frames) != self.max_frames or self.max_frames < 1):
            raise ValueError(f"video sampling: max_frames must be a positive integer or None, got {self.max_frames!r}")


@dataclass
class FrameScore:
    index: int
    time: float
    score: float
    probs: tuple[float, ...]


@dataclass
class ScoreRow:
    """One input's result. ``score`` is on [1, 5] (bad = 1 ... excellent = 5)."""

    path: str
    score: float | None = None
    probs: tuple[float, ...] | None = None  # bad, poor, fair, good, excellent
    error: str = ""
    kind: str = "image"  # "video"; "unknown" on the error row of a file that is neither
    frames: int = 0
    warnings: list[str] = field(default_factory=list)
    per_frame: list[FrameScore] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def score_0_1(self) -> float | None:
        return None if self.score is None else (self.score - 1.0) / 4.0

    @property
    def level(self) -> str | None:
        """The most probable level word."""
        return None if self.probs is None else LEVELS[int(np.argmax(self.probs))]

    def as_dict(self) -> dict:
        row = {"path": self.path, "score_1_5": self.score, "score_0_1": self.score_0_1}
        row.update(zip(PROB_FIELDS, self.probs if self.probs is not None else [None] * len(LEVELS)))
        row["error"] = self.error
        return row


@dataclass
class _Prepared:
    name: str
    pixels: object = None  # tensor [F, C, H, W]
    error: str = ""
    kind: str = "image"
    warnings: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)


def input_name(item, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, (list, tuple)):
        return f"<video {index}>"
    return f"<image {index}>"


def is_video_input(item) -> bool:
    """A list of frames, or a path whose bytes say video (the extension only breaks ties)."""
    return _sniff(item)[0] == "video"


# Content that is neither image nor video, as the sniffer names it -> words for the error row.
_NOT_MEDIA = {"text": "a text file", "audio": "audio only", "wav": "audio only (WAVE)", "m4a": "audio only (M4A)",
              "ogg": "audio only (Ogg)", "riff": "a RIFF file that is not AVI or WebP"}


def _sniff(item) -> tuple[str, str]:
    """(kind, format) of an input: ("video", "frames") for a list of frames, ("image", "pil") for
    an image object, the sniffer's verdict for an existing file, ("image", "") otherwise (so that
    the image loader gives the error for a missing path)."""
    if isinstance(item, (list, tuple)):
        return "video", "frames"
    if not isinstance(item, (str, os.PathLike)) or not os.path.isfile(item):
        return "image", ""
    from .media.sniff import detect

    found = detect(item)
    return found.kind, found.format


class Scorer:
    """Scores images (paths or PIL images) with one backend. Thread-safe for reading only."""

    def __init__(self, backend: Backend, batch_size: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS,
                 workers: int | None = None, video: VideoOptions = VideoOptions()):
        self.backend = backend
        self.batch_size = max(1, int(batch_size))
        self.max_pixels = max_pixels
        self.video = video
        self.workers = workers if workers is not None else min(4, os.cpu_count() or 1)

    @property
    def info(self):
        return self.backend.info

    def score(self, inputs, task: str = "quality", batch_size: int | None = None, progress: bool = False) -> list[ScoreRow]:
        """Score a path, a PIL image, or a sequence of them (a video: a path, or a list of PIL
        frames inside the sequence). One row per input, in order."""
        if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "convert"):
            inputs = [inputs]
        return list(self.iter_score(list(inputs), task=task, batch_size=batch_size, progress=progress))

    def iter_score(self, inputs: Sequence, task: str = "quality", batch_size: int | None = None,
                   progress: bool = False) -> Iterator[ScoreRow]:
        """Yield rows in input order as their batches finish (for streaming writers)."""
        self.backend.check_task(task)
        size = batch_size or self.batch_size
        bar = _progress(len(inputs)) if progress else None
        batch: list[_Prepared] = []
        try:
            for prepared in self._prepare_ahead(inputs, lookahead=2 * size):
                batch.append(prepared)
                if len(batch) == size:
                    yield from self._flush(batch, task, bar)
                    batch = []
            yield from self._flush(batch, task, bar)
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------ internals

    def _prepare(self, item, index: int) -> _Prepared:
        name = input_name(item, index)
        kind = "image"
        try:
            kind, fmt = _sniff(item)
            if kind == "video":
                return self._prepare_video(item, name)
            if kind == "unknown" and fmt in _NOT_MEDIA:
                raise MediaError(f"{name}: not a recognised image format, nor a video: the file is {_NOT_MEDIA[fmt]}")
            try:
                image = load_image(item, max_pixels=self.max_pixels)
            except MediaError as exc:
                if kind == "unknown" and str(exc).endswith("not a recognised image format"):
                    raise MediaError(f"{name}: not a recognised image format, nor a video") from None
                raise
            pixels = self.backend.preprocess(image)[None]
            return _Prepared(name, pixels)
        except (MediaError, ValueError, FileNotFoundError) as exc:
            return _Prepared(name, error=str(exc) if name in str(exc) else f"{name}: {exc}", kind=kind)
        except Exception as exc:  # a batch never dies on one bad file
            return _Prepared(name, error=f"{name}: {type(exc).__name__}: {exc}", kind=kind)

    def _prepare_video(self, item, name: str) -> _Prepared:
        """Frames streamed one at a time into the preprocessor: memory bounded by the frame cap."""
        if isinstance(item, (list, tuple)):
            if not item:
                raise MediaError(f"{name}: a video needs at least one frame")
            frames = ((load_image(f, max_pixels=self.max_pixels), float(i), i) for i, f in enumerate(item))
            pixels, times, indices = self._preprocess_frames(frames, len(item))
            return _Prepared(name, pixels, kind="video", times=times, indices=indices)
        from .media.video import read_frames

        stream = read_frames(item, fps=self.video.fps, frames=self.video.frames, max_frames=self.video.max_frames)
        with stream:
            frames = ((f.image, f.time, f.index) for f in stream)
            pixels, times, indices = self._preprocess_frames(frames, len(stream.planned))
        return _Prepared(name, pixels, kind="video", warnings=list(stream.warnings), times=times, indices=indices)

    def _preprocess_frames(self, frames, expected: int):
        """Preprocess each frame as it comes into one [F, C, H, W] tensor allocated once for the
        ``expected`` frames (a list of frames and ``torch.stack`` would hold every frame twice)."""
        import torch

        out = None
        times, indices = [], []
        for image, time, index in frames:
            x = self.backend.preprocess(image)
            k = len(times)
            if out is None:
                out = torch.empty((max(1, expected), *x.shape), dtype=x.dtype, device=x.device)
            elif k == out.shape[0]:  # more frames than planned (never expected): grow
                out = torch.cat([out, torch.empty_like(out)])
            if x.shape != out.shape[1:]:
                raise MediaError(f"frame {k} preprocesses to {tuple(x.shape)}, frame 0 to {tuple(out.shape[1:])}: "
                                 f"this model needs all frames of a video at one size")
            out[k] = x
            times.append(time)
            indices.append(index)
        if out is None:
            raise MediaError("no frame could be decoded")
        return out[: len(times)], times, indices

    def _prepare_ahead(self, inputs: Sequence, lookahead: int) -> Iterator[_Prepared]:
        """Decode and preprocess in threads, at most ``lookahead`` items ahead of the model."""
        if self.workers <= 1:
            for i, item in enumerate(inputs):
                yield self._prepare(item, i)
            return
        with ThreadPoolExecutor(self.workers) as pool:
            pending: deque = deque()
            it = iter(enumerate(inputs))
            for i, item in it:
                pending.append(pool.submit(self._prepare, item, i))
                if len(pending) >= lookahead:
                    break
            for i, item in it:
                yield pending.popleft().result()
                pending.append(pool.submit(self._prepare, item, i))
            while pending:
                yield pending.popleft().result()

    def _flush(self, batch: list[_Prepared], task: str, bar) -> Iterator[ScoreRow]:
        results: dict[int, ScoreRow] = {}
        for kind in ("image", "video"):
            group = [p for p in batch if not p.error and p.kind == kind]
            if group:
                for p, row in zip(group, self._score_prepared(group, task)):
                    results[id(p)] = row
        for p in batch:
            row = results.get(id(p)) or ScoreRow(p.name, error=p.error, kind=p.kind)
            if bar is not None:
                bar.update(1)
            yield row

    def _score_prepared(self, prepared: list[_Prepared], task: str) -> list[ScoreRow]:
        if prepared[0].kind == "video" and self.backend.info.video != "native":
            return [self._score_per_frame(p, task) for p in prepared]
        try:
            logits = self.backend.level_logits([p.pixels for p in prepared], task=task, input_kind=prepared[0].kind)
        except Exception as exc:
            if len(prepared) == 1:
                return [ScoreRow(prepared[0].name, error=f"{prepared[0].name}: model failed: {type(exc).__name__}: {exc}",
                                 kind=prepared[0].kind, warnings=prepared[0].warnings)]
            # One item broke the batch: score one by one so only that item fails.
            return [row for p in prepared for row in self._score_prepared([p], task)]
        probs, scores = logits_to_scores(np.asarray(logits, dtype=np.float64))
        return [
            ScoreRow(p.name, float(s), tuple(float(x) for x in pr), kind=p.kind, frames=int(p.pixels.shape[0]),
                     warnings=p.warnings)
            for p, s, pr in zip(prepared, scores, probs)
        ]


    def _score_per_frame(self, p: _Prepared, task: str) -> ScoreRow:
        """Each frame judged as an image; the item's logits are the mean of the frames' logits."""
        try:
            frame_logits = np.concatenate([
                np.asarray(self.backend.level_logits([f[None] for f in p.pixels[i:i + self.batch_size]], task=task,
                                                     input_kind="image"), dtype=np.float64)
                for i in range(0, p.pixels.shape[0], self.batch_size)
            ])
        except Exception as exc:
            return ScoreRow(p.name, error=f"{p.name}: model failed: {type(exc).__name__}: {exc}", kind=p.kind)
        probs, scores = logits_to_scores(frame_logits.mean(0, keepdims=True))
        frame_probs, frame_scores = logits_to_scores(frame_logits)
        per_frame = [FrameScore(i, t, float(s), tuple(float(x) for x in pr))
                     for i, t, s, pr in zip(p.indices, p.times, frame_scores, frame_probs)]
        return ScoreRow(p.name, float(scores[0]), tuple(float(x) for x in probs[0]), kind="video",
                        frames=len(per_frame), warnings=p.warnings, per_frame=per_frame)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="scoring", dynamic_ncols=True, disable=None)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm"}
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"}


def expand_inputs(patterns: Iterable[str], recursive: bool = False, extensions: set[str] | None = None) -> list[str]:
    """Files, folders and globs -> a sorted, de-duplicated list of file paths.

    A folder contributes its files with known image and video extensions (recursively with ``recursive``);
    an explicit file is always kept (its content decides); a path that does not exist is kept too,
    so that it gets an error row instead of vanishing.
    """
    import glob

    extensions = extensions or IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    out: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            out.extend(sorted(str(p) for p in walker if p.is_file() and p.suffix.lower() in extensions))
        elif any(ch in pattern for ch in "*?["):
            out.extend(sorted(p for p in glob.glob(pattern, recursive=recursive) if Path(p).is_file()))
        else:
            out.append(pattern)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]
