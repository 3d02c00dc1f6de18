"""Video decoding and frame sampling for Q-Align (PyAV, i.e. the FFmpeg inside its wheel).

Public API
----------
``probe(path) -> VideoInfo``
    Container/stream facts: duration, average fps, frame count, size,
    rotation, codec.
``plan_times(duration, *, fps=None, frames=None, max_frames=16) -> list[float]``
    The sampling plan: the times (seconds from the start of the video
    stream) at which frames are taken.
``read_frames(path, *, fps=None, frames=None, max_frames=16) -> FrameStream``
    A lazy iterator of :class:`Frame` (upright PIL RGB image, time, index);
    its ``warnings`` list is complete once it is exhausted.
``sample_video(path, *, fps=None, frames=None, max_frames=16) -> SampledVideo``
    The same, collected: ``frames`` (PIL images), ``times``, ``info``,
    ``warnings``.
``decoder_support() -> dict[str, str | None]``
    Which decoder this FFmpeg build uses for H.264, HEVC, VP9, AV1, ...
``VideoError(ValueError)``
    Raised with the file name and the reason when nothing usable comes out.

Sampling (all plans are built from timestamps, never frame counts, so
variable-frame-rate video is sampled by time):

* ``fps=F`` (default ``F = 1`` when neither ``fps`` nor ``frames`` is given):
  Q-Align's plan, one frame every 1/F s at t = 0, 1/F, 2/F, ...;
  ``max(1, floor(duration * F))`` of them.  For F = 1 that is exactly the
  upstream count ``floor(n_frames / fps)`` and, on constant-frame-rate video,
  exactly the upstream frames (``int(fps * i)``); a clip shorter than 1 s
  still gives one frame (upstream gives none and fails).
* ``max_frames`` (default 16) caps the fps plan -- upstream has no cap, so a
  15-minute clip became 900 frames and ran out of memory (Q-Align issue 36).
  When the plan is longer, ``max_frames`` of its times are kept, taken at the
  centres of ``max_frames`` equal runs of the plan, so every kept time is one
  upstream would also have used.  16 frames x 65 visual tokens = 1040 tokens
  keeps the official model's context (2048) comfortably clear of the
  prompt; pass ``max_frames=None`` for no cap.
* ``frames=N``: N frames at the centres of N equal segments of the duration,
  ``t_i = (i + 0.5) * duration / N`` (Q-ReAlign uses N = 8).  Centres, not
  ``linspace(0, end)``, so neither the first frame (often black or a fade) nor
  the very last one is over-represented.  ``max_frames`` does not apply: N
  itself is the bound.

Which frame is "the frame at time t": the one a player shows at t, i.e. the
last frame whose presentation time is <= t (the first frame when t lies
before it).  On constant-frame-rate video this reproduces upstream's index
``int(fps * t)``; on variable-frame-rate video a held frame is held.

Streaming and memory: a :class:`FrameStream` keeps at most two decoded
frames (the candidate for the current time and one look-ahead frame) besides
the images it has yielded, so ``sample_video`` holds at most ``max_frames``
(fps mode) or N (frames mode) images plus two frames, whatever the length of
the video.  Between planned times it seeks (keyframe seek, then decodes
forward to the frame on screen at the target) when the container index shows
a keyframe between the current position and the next time -- or, without an
index, when the gap exceeds the longest keyframe interval seen -- and
otherwise decodes forward.  A seek that raises, or that lands after its
target twice (the second time from 10 s earlier), switches the stream to
sequential decoding from the start.

Damaged files: packets that fail to decode are skipped.  A planned time is
dropped when its frame is known to be lost -- a packet inside the gap failed
to decode, an AVI index lists frames the demuxer never delivered (its
timestamps are first re-anchored to the index by file position, because the
AVI demuxer mis-numbers frames after resyncing), or nothing decodes after it
(truncation) -- and the result carries a warning "used K of N planned
frames (...)".  Only when no frame at all decodes is ``VideoError`` raised.
A gap in the timestamps alone is not treated as damage, since variable
frame rate video holds frames legitimately: where a Matroska/WebM/MPEG-TS
demuxer silently skips damaged bytes, the last good frame stands in.
Headers that over-promise (tree.avi: 444 frames declared, 68 stored) give a
warning of their own.

Rotation: frames are returned upright.  The display matrix that FFmpeg
attaches to each decoded frame (from the MP4/MOV track matrix or Matroska
projection) is honoured, and failing that the legacy stream tag ``rotate``.
``VideoInfo.rotation`` is the counter-clockwise angle that is applied
(FFmpeg's convention: a phone's portrait clip typically reads -90 -> 270).
Mirroring in the display matrix and non-square pixels (sample aspect ratio)
are not applied.

Colour: frames are converted to RGB by swscale using the colour matrix and
range the stream declares (BT.601 when undeclared).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from PIL import Image

from . import sniff

try:  # PyAV is the optional "video" extra
    import av
    import av.logging
except ImportError:  # pragma: no cover - exercised only without the extra
    av = None

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "Frame",
    "FrameStream",
    "SampledVideo",
    "VideoError",
    "VideoInfo",
    "decoder_support",
    "plan_times",
    "probe",
    "read_frames",
    "sample_video",
]

DEFAULT_MAX_FRAMES = 16
DEFAULT_FPS = 1.0

_EPS = 1e-6  # seconds: timestamps closer than this are "the same time"
# Formats whose index lists every frame (so index size vs header count means something)
_FULL_INDEX_FORMATS = ("avi", "mov", "mp4")
# Formats whose duration FFmpeg only estimates (no index, no header duration)
_ESTIMATED_DURATION_FORMATS = frozenset(["mpeg", "mpegts", "mpegvideo", "m4v", "h264", "hevc", "vc1", "cavsvideo"])
# Families reported by decoder_support(): family -> decoder names to try, best first.
# FFmpeg's native "av1" decoder only drives hardware; software AV1 needs libdav1d / libaom.
_FAMILIES: dict[str, tuple[str, ...]] = {
    "h264": ("h264",),
    "hevc": ("hevc",),
    "vp8": ("vp8", "libvpx"),
    "vp9": ("vp9", "libvpx-vp9"),
    "av1": ("libdav1d", "libaom-av1"),
    "vvc": ("vvc",),
    "mpeg4": ("mpeg4",),
    "mpeg2video": ("mpeg2video",),
    "mjpeg": ("mjpeg",),
    "prores": ("prores",),
    "theora": ("theora",),
    "vc1": ("vc1",),
}


class VideoError(ValueError):
    """A file that cannot be used as a video; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its (first) video stream.

    ``duration`` and ``start_time`` are seconds; times everywhere in this
    module are relative to ``start_time`` (the first frame is at ~0).
    ``frames`` is the frame count the container declares (None when it
    declares none, e.g. Matroska); ``stored_frames`` the number of frames its
    index holds for formats that index every frame (AVI, MP4/MOV), which is
    how a header that over-promises (dropped frames) is caught.
    ``width``/``height`` are the coded size; ``display_size`` applies
    ``rotation`` (degrees counter-clockwise, 0/90/180/270).
    """

    path: str
    duration: float
    fps: float
    frames: int | None
    width: int
    height: int
    rotation: int
    codec: str
    decoder: str
    container: str
    start_time: float = 0.0
    stored_frames: int | None = None
    duration_source: str = "stream"
    warnings: tuple[str, ...] = ()

    @property
    def display_size(self) -> tuple[int, int]:
        if self.rotation % 180 == 90:
            return self.height, self.width
        return self.width, self.height


@dataclass(frozen=True)
class Frame:
    """One sampled frame.

    ``image``: upright PIL RGB image.  ``time``: its presentation time in
    seconds from the start of the stream.  ``index``: its frame number,
    ``round(time * info.fps)`` -- exact for constant-frame-rate video, an
    estimate for variable frame rate.  ``target``: the planned time it was
    taken for (the frame is the one on screen at ``target``).
    """

    image: Image.Image
    time: float
    index: int
    target: float


@dataclass
class SampledVideo:
    """Result of :func:`sample_video`.

    ``frames``: upright PIL RGB images in time order; ``times``: their
    presentation times (s); ``indices``: their frame numbers (see
    :class:`Frame`); ``planned``: the planned times; ``warnings``:
    human-readable problems (empty for a clean file).
    """

    frames: list[Image.Image]
    times: list[float]
    info: VideoInfo
    warnings: list[str]
    indices: list[int] = field(default_factory=list)
    planned: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)


# --------------------------------------------------------------------------- helpers


def _require_av() -> None:
    if av is None:
        raise ImportError("video support needs PyAV: pip install 'qalign[video]' (or: pip install av)")


def decoder_support() -> dict[str, str | None]:
    """Decoder this PyAV/FFmpeg build has for each common video codec (None: none)."""
    _require_av()
    out: dict[str, str | None] = {}
    for family, names in _FAMILIES.items():
        out[family] = None
        for name in names:
            try:
                av.codec.Codec(name, "r")
            except Exception:
                continue
            out[family] = name
            break
    return out


def _stream_descriptions(container) -> dict[int, str]:
    """FFmpeg's one-line description of each stream (what ffprobe prints).

    Used to name a codec that this build cannot decode (PyAV gives such a
    stream no codec context).  FFmpeg prints this through its log, so the
    log level is raised for the duration of the call.
    """
    level = av.logging.get_level()
    try:
        av.logging.set_level(av.logging.INFO)
        text = container.dumps_format()
    except Exception:
        return {}
    finally:
        av.logging.set_level(level)
    out: dict[int, str] = {}
    for m in re.finditer(r"Stream #\d+:(\d+)[^:]*: \w+: (.*)", text):
        out[int(m.group(1))] = m.group(2).strip()
    return out


def _codec_label(description: str) -> str:
    """'none (QZQZ / 0x5A515A51), none, 64x48' -> "unknown codec with FourCC 'QZQZ'"."""
    head = description.split(",")[0].strip()
    m = re.match(r"none \(([^/)]+?)\s*/\s*0x[0-9A-Fa-f]+\)", head)
    if m:
        return f"unknown codec with FourCC {m.group(1)!r}"
    return repr(head.split(" (")[0]) if head else "unknown codec"


def _fraction_seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _parse_hms(text: str) -> float | None:
    """'00:00:02.000000000' (Matroska DURATION tag) -> 2.0"""
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*", text or "")
    if not m:
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def _normalise_rotation(degrees: float) -> int:
    """Any angle -> 0/90/180/270 (counter-clockwise) when within 1 degree of one; else rounded."""
    r = degrees % 360
    nearest = int(round(r / 90.0)) * 90 % 360
    if abs(((r - nearest) + 180) % 360 - 180) <= 1.0:
        return nearest
    return int(round(r)) % 360


def _frame_rotation(frame, stream_tag: int | None) -> int:
    """Counter-clockwise rotation to apply to ``frame`` to show it upright."""
    try:
        has_matrix = any(str(getattr(sd, "type", "")).endswith("DISPLAYMATRIX") for sd in frame.side_data)
    except Exception:
        has_matrix = False
    if has_matrix:
        return _normalise_rotation(frame.rotation)
    if stream_tag:
        return _normalise_rotation(stream_tag)
    return 0


def _stream_rotation_tag(stream) -> int | None:
    """Legacy ``rotate`` stream tag (degrees CLOCKWISE) as a counter-clockwise angle."""
    tag = (stream.metadata or {}).get("rotate")
    if tag is None:
        return None
    try:
        return int(round(-float(tag)))
    except ValueError:
        return None


def _upright(image: Image.Image, rotation: int) -> Image.Image:
    r = rotation % 360
    if r == 0:
        return image
    if r == 90:
        return image.transpose(Image.Transpose.ROTATE_90)
    if r == 180:
        return image.transpose(Image.Transpose.ROTATE_180)
    if r == 270:
        return image.transpose(Image.Transpose.ROTATE_270)
    return image.rotate(r, resample=Image.Resampling.BICUBIC, expand=True)


def _to_image(frame) -> Image.Image:
    """Decoded frame -> PIL RGB, honouring the range the frame declares."""
    kwargs = {}
    try:
        if frame.color_range:
            kwargs["src_color_range"] = frame.color_range
    except Exception:  # pragma: no cover - very old PyAV
        pass
    try:
        image = frame.to_image(**kwargs)
    except Exception:
        image = frame.to_image()
    return image if image.mode == "RGB" else image.convert("RGB")


def _is_attached_picture(stream) -> bool:
    try:
        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except Exception:
        return False


def _open_container(path: Path):
    """Open ``path`` and pick its video stream, or raise VideoError saying why not."""
    _require_av()
    name = str(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such video file", name)
    if path.is_dir():
        raise VideoError(f"{name}: is a directory, not a video file")
    size = path.stat().st_size
    if size == 0:
        raise VideoError(f"{name}: empty file (0 bytes), not a video")
    sniffed = sniff.detect(path)
    if sniffed.kind == "image":
        raise VideoError(f"{name}: is a still image ({sniffed.format}), not a video")
    if sniffed.format == "text":
        raise VideoError(f"{name}: is a text file, not a video")
    try:
        container = av.open(name, metadata_errors="ignore")
    except av.error.FileNotFoundError:
        raise FileNotFoundError(2, "no such video file", name) from None
    except av.error.FFmpegError as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        if sniffed.kind == "video":
            raise VideoError(
                f"{name}: looks like {sniffed.format} but its container cannot be read "
                f"(truncated or corrupt header; FFmpeg: {reason})"
            ) from None
        raise VideoError(f"{name}: not a video (no known container format; FFmpeg: {reason})") from None
    try:
        fmt = container.format.name
        if fmt == "tty" or fmt.endswith("_pipe") or fmt in ("image2", "gif", "webp", "apng"):
            raise VideoError(f"{name}: not a video (FFmpeg reads it as {fmt!r}: text or a still image)")
        videos = [s for s in container.streams.video if not _is_attached_picture(s)]
        if not videos:
            others = ", ".join(
                f"{s.type} {s.codec_context.name if s.codec_context else '?'}" for s in container.streams
            )
            covers = " (only cover art)" if container.streams.video else ""
            raise VideoError(f"{name}: no video stream{covers} (streams: {others or 'none'})")
        stream = videos[0]
        if stream.codec_context is None:
            label = _codec_label(_stream_descriptions(container).get(stream.index, ""))
            raise VideoError(
                f"{name}: unsupported video codec {label}: this FFmpeg build "
                f"(PyAV {av.__version__}) has no decoder for it"
            )
        return container, stream, sniffed
    except BaseException:
        container.close()
        raise


def _scan_duration(path: Path, stream_index: int, *, from_end: bool) -> tuple[float | None, int]:
    """End of the stream (s after its start) and packets seen, by demuxing without decoding.

    ``from_end``: seek near the end first and read only the tail (cheap; how
    FFmpeg itself estimates MPEG-PS/TS durations, done here because its
    estimate can be far off for small or odd files).  Raw elementary streams
    carry no timestamps: their packets' durations are summed instead.
    """
    end = None
    count = 0
    total = 0
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            s = c.streams[stream_index]
            tb = s.time_base
            start = s.start_time or 0
            if from_end:
                try:
                    c.seek(2**62, stream=s, backward=True)
                except av.error.FFmpegError:
                    pass
            for packet in c.demux(s):
                if packet.size == 0:
                    continue
                count += 1
                total += packet.duration or 0
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    continue
                t = float((ts - start + (packet.duration or 0)) * tb)
                end = t if end is None else max(end, t)
            if end is None and total and not from_end:
                end = float(total * tb)
    except av.error.FFmpegError:
        pass
    return end, count


def _build_info(path: Path, container, stream, *, rotation: int = 0) -> VideoInfo:
    tb = stream.time_base
    fmt = container.format.name
    start = _fraction_seconds(stream.start_time, tb)
    cstart = container.start_time / 1e6 if container.start_time is not None else 0.0
    if start is None:
        start = 0.0
    declared = stream.frames if stream.frames and stream.frames > 0 else None
    fps = 0.0
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            fps = float(rate)
            break
    duration, source = None, "stream"
    if stream.duration and stream.duration > 0:
        duration = _fraction_seconds(stream.duration, tb)
    if not duration:
        duration, source = _parse_hms((stream.metadata or {}).get("DURATION", "")), "tag"
    if not duration and container.duration and container.duration > 0:
        duration, source = container.duration / 1e6 - max(0.0, start - cstart), "container"
    if not duration and declared and fps:
        duration, source = declared / fps, "frame count"
    if fmt in _ESTIMATED_DURATION_FORMATS:
        end, _ = _scan_duration(path, stream.index, from_end=True)
        if end:
            duration, source = end, "scan"
    if not duration:
        duration, scanned = _scan_duration(path, stream.index, from_end=False)
        source = "scan"
        if declared is None and scanned:
            declared = scanned
    duration = float(duration) if duration and duration > 0 else 0.0
    if (not fps or source == "scan") and declared and duration:
        fps = declared / duration  # counted: better than FFmpeg's 25 fps guess for raw streams

    stored = None
    warnings: list[str] = []
    if any(f in fmt.split(",") for f in _FULL_INDEX_FORMATS):
        try:
            stored = sum(1 for e in stream.index_entries if e.size > 0) or None
        except Exception:
            stored = None
    if stored and declared and stored < declared:
        warnings.append(
            f"{path.name}: the header declares {declared} frames but only {stored} are stored "
            f"(dropped or missing frames); each sample is the frame on screen at its time"
        )
    cc = stream.codec_context
    return VideoInfo(
        path=str(path),
        duration=duration,
        fps=fps,
        frames=declared,
        width=stream.width or cc.width,
        height=stream.height or cc.height,
        rotation=rotation,
        codec=cc.codec.canonical_name if cc is not None else "?",
        decoder=cc.name if cc is not None else "?",
        container=fmt,
        start_time=float(start),
        stored_frames=stored,
        duration_source=source,
        warnings=tuple(warnings),
    )


def probe(path: str | os.PathLike) -> VideoInfo:
    """Facts about the video stream of ``path``.

    Decodes the first frame (and only that) to read the rotation FFmpeg
    attaches to frames.  Raises :class:`VideoError` for an empty file, a
    non-video, a file without a video stream or with a codec this build
    cannot decode; ``FileNotFoundError`` when the file is missing.
    """
    p = Path(path)
    container, stream, _ = _open_container(p)
    try:
        info = _build_info(p, container, stream)
        tag = _stream_rotation_tag(stream)
        rotation = _normalise_rotation(tag) if tag else 0
        try:
            for n, packet in enumerate(container.demux(stream)):
                if n >= 300:  # nothing decodes early on: leave the rotation to the tag
                    break
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError:
                    continue
                if decoded:
                    rotation = _frame_rotation(decoded[0], tag)
                    break
        except av.error.FFmpegError:
            pass
        return replace(info, rotation=rotation)
    finally:
        container.close()


def plan_times(
    duration: float,
    *,
    fps: float | None = None,
    frames: int | None = None,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
) -> list[float]:
    """Sampling times (seconds from the stream start); see the module docstring.

    >>> plan_times(10.0)                       # Q-Align: 1 fps
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    >>> plan_times(10.0, frames=4)             # centres of 4 segments
    [1.25, 3.75, 6.25, 8.75]
    >>> plan_times(0.5)                        # short clip: still one frame
    [0.0]
    """
    if fps is not None and frames is not None:
        raise ValueError("pass either fps or frames, not both")
    if frames is not None:
        if int(frames) != frames or frames < 1:
            raise ValueError(f"frames must be a positive integer, got {frames!r}")
        n = int(frames)
        d = duration if duration and math.isfinite(duration) and duration > 0 else 0.0
        return [(i + 0.5) * d / n for i in range(n)]
    if fps is None:
        fps = DEFAULT_FPS
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
    d = duration if duration and math.isfinite(duration) and duration > 0 else 0.0
    n = max(1, int(math.floor(d * fps + 1e-9)))
    if max_frames is not None and n > max_frames:
        keep = [int((i + 0.5) * n / max_frames) for i in range(max_frames)]
    else:
        keep = range(n)
    return [k / fps for k in keep]


# --------------------------------------------------------------------------- streaming


class _Decoded:
    """A decoded frame with its time (s from the origin) and display span (s)."""

    __slots__ = ("frame", "time", "span", "declared_span", "_image")

    def __init__(self, frame, time: float, span: float, declared_span: bool):
        self.frame = frame
        self.time = time
        self.span = span
        self.declared_span = declared_span
        self._image: Image.Image | None = None

    def image(self, rotation_tag: int | None) -> tuple[Image.Image, int]:
        rotation = _frame_rotation(self.frame, rotation_tag)
        if self._image is None:
            self._image = _upright(_to_image(self.frame), rotation)
        return self._image, rotation


class FrameStream(Iterator[Frame]):
    """Lazy iterator of sampled :class:`Frame` objects (see :func:`read_frames`).

    Attributes: ``info`` (:class:`VideoInfo`; ``rotation`` filled from the
    first decoded frame), ``planned`` (the planned times), ``warnings``
    (complete once the iterator is exhausted), and work counters
    ``decoded`` (frames decoded), ``seeks`` and ``decode_errors``.
    Use as a context manager or call :meth:`close` to release the file early.
    """

    def __init__(self, path, *, fps=None, frames=None, max_frames=DEFAULT_MAX_FRAMES):
        self.path = Path(path)
        self._container = None
        self._container, self._stream, _ = _open_container(self.path)
        try:
            self.info = _build_info(self.path, self._container, self._stream)
            self.planned = plan_times(self.info.duration, fps=fps, frames=frames, max_frames=max_frames)
        except BaseException:
            self._close_container()
            raise
        self.warnings: list[str] = list(self.info.warnings)
        self.decoded = 0
        self.seeks = 0
        self.decode_errors = 0
        self.yielded = 0
        self._rotation_tag = _stream_rotation_tag(self._stream)
        self._seekable = True
        self._last_key: float | None = None
        self._key_gap = 0.0
        # time zero: the stream start, moved to the first decoded frame when that is a
        # frame or two later (AVI with packed B-frames numbers its first frame 1)
        self._origin = self._stream.start_time or 0
        self._is_avi = self.info.container == "avi"
        self._avi_positions: dict[int, int] | None = None
        self._errors: list[float] = []  # times of packets that failed to decode
        self._last_time: float | None = None
        self._last_span = 0.0
        self._demux_error: str | None = None
        self._gen = self._run()

    # -- iterator protocol ---------------------------------------------------------------
    def __iter__(self) -> "FrameStream":
        return self

    def __next__(self) -> Frame:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        self._close_container()

    def _close_container(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> "FrameStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- decoding ------------------------------------------------------------------------
    def _fix_avi_timestamps(self, packet) -> None:
        """After damage the AVI demuxer resyncs on the next chunk but keeps counting from
        where it lost track, so timestamps slide; the index (by file position) knows the truth."""
        if packet.dts is None or packet.pos is None or packet.pos < 0:
            return
        entries = self._stream.index_entries
        try:
            i = entries.search_timestamp(packet.dts, backward=True, any_frame=True)
            if i >= 0 and entries[i].timestamp == packet.dts and entries[i].pos + 8 == packet.pos:
                return
        except Exception:
            return
        if self._avi_positions is None:
            self._avi_positions = {e.pos + 8: e.timestamp for e in entries}
        true_dts = self._avi_positions.get(packet.pos)
        if true_dts is not None and true_dts != packet.dts:
            shift = true_dts - packet.dts
            packet.dts = true_dts
            if packet.pts is not None:
                packet.pts = packet.pts + shift

    def _error_at(self, t: float | None) -> None:
        self.decode_errors += 1
        if t is None:  # unknown: just after the last frame that decoded
            t = (self._last_time if self._last_time is not None else 0.0) + 1e-3
        self._errors.append(t)

    def _decode(self) -> Iterator[_Decoded]:
        """Decode the video stream from the current position; skip what fails."""
        stream = self._stream
        tb = stream.time_base
        default_span = 1.0 / self.info.fps if self.info.fps else 0.04
        avi_fix = self._is_avi and len(stream.index_entries) > 0

        def wrap(frame) -> _Decoded:
            declared = bool(frame.duration)
            span = float(frame.duration * tb) if declared else default_span
            if frame.pts is not None:
                t = float((frame.pts - self._origin) * tb)
            else:  # no timestamps (raw elementary streams): count frame durations
                t = (self._last_time + self._last_span) if self._last_time is not None else 0.0
            self._last_span = span
            if frame.key_frame:
                if self._last_key is not None and t > self._last_key:
                    self._key_gap = max(self._key_gap, t - self._last_key)
                self._last_key = t
            self._last_time = t
            self.decoded += 1
            return _Decoded(frame, t, span, declared)

        def packet_time(packet) -> float | None:
            ts = packet.pts if packet.pts is not None else packet.dts
            return None if ts is None else float((ts - self._origin) * tb)

        packets = self._container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as exc:  # the demuxer gave up: damaged container
                self._error_at(None)
                self._demux_error = f"{getattr(exc, 'strerror', None) or exc}"
                try:
                    tail = stream.codec_context.decode(None)  # drain the decoder
                except av.error.FFmpegError:
                    tail = []
                for frame in tail:
                    yield wrap(frame)
                return
            if avi_fix and packet.size:
                self._fix_avi_timestamps(packet)
            try:
                decoded = packet.decode()
            except av.error.EOFError:
                decoded = []
            except av.error.FFmpegError:
                self._error_at(packet_time(packet))
                continue
            for frame in decoded:
                yield wrap(frame)

    def _keyframe_after(self, pos: float | None, target: float) -> bool | None:
        """Does a keyframe lie in (pos, target]?  None when the index cannot tell."""
        stream = self._stream
        try:
            entries = stream.index_entries
            if len(entries) == 0:
                return None
            tb = stream.time_base
            ts = int(self._origin + target / float(tb))
            i = entries.search_timestamp(ts, backward=True)
            if i < 0:
                return False
            key_t = float((entries[i].timestamp - self._origin) * tb)
        except Exception:
            return None
        return key_t > (pos if pos is not None else 0.0) + _EPS

    def _should_seek(self, pos: float | None, target: float) -> bool:
        if not self._seekable:
            return False
        here = pos if pos is not None else 0.0
        gap = target - here
        if gap <= 0.5:
            return False
        answer = self._keyframe_after(pos, target)
        if answer is not None:
            return answer
        # no index: seek when the gap exceeds the longest keyframe interval seen (5 s until known)
        if self._last_key is None:
            estimate = 5.0
        else:
            estimate = max(self._key_gap, here - self._last_key, 1.0)
        return gap > estimate + 0.5

    def _seek(self, target: float, margin: float) -> bool:
        stream = self._stream
        ts = int(math.floor(self._origin + max(0.0, target - margin) / float(stream.time_base)))
        try:
            self._container.seek(ts, stream=stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            return False
        self.seeks += 1
        return True

    def _restart_sequential(self) -> None:
        """Seeking failed: reopen and decode from the start, never seeking again."""
        self._seekable = False
        self._close_container()
        self._container, self._stream, _ = _open_container(self.path)
        self._last_key = None

    def _stored_between(self, held: _Decoded, t: float) -> bool:
        """AVI only: does the index list a frame after ``held`` and at or before ``t``?"""
        try:
            entries = self._stream.index_entries
            tb = self._stream.time_base
            ts = int(self._origin + (t + _EPS) / float(tb))
            i = entries.search_timestamp(ts, backward=True, any_frame=True)
            if i < 0:
                return False
            return held.frame.pts is not None and entries[i].timestamp > held.frame.pts
        except Exception:
            return True

    def _lost(self, held: _Decoded, t: float, ahead: _Decoded | None) -> bool:
        """Was the frame on screen at ``t`` lost (decode error, skipped data, truncation)?

        A frame is "held" across a gap in the timestamps only without evidence of
        damage, because variable-frame-rate video holds frames legitimately (and
        Matroska declares bogus default durations for it).  Evidence: a packet
        that failed to decode inside the gap, an AVI index listing frames inside
        it, or no frame at all after it (truncation).
        """
        if any(held.time + _EPS < e <= t + _EPS for e in self._errors):
            return True
        # up to two frame durations of slack: reordered timestamps (AVI with packed
        # B-frames) can deliver the frame between ``held`` and ``ahead`` late
        slack = 2.5 * (1.0 / self.info.fps if self.info.fps else held.span)
        if t <= held.time + max(slack, held.span if held.declared_span else 0.0) + _EPS:
            return False
        if ahead is None:
            return True  # nothing decodes after it: truncated (or the duration over-promises)
        if self._is_avi:
            return self._stored_between(held, t)  # dropped-frame AVIs (tree.avi) have real gaps
        return False

    def _run(self) -> Iterator[Frame]:
        try:
            yield from self._sample()
        finally:
            self._close_container()

    def _sample(self) -> Iterator[Frame]:
        info = self.info
        planned = self.planned
        source = self._decode()
        held: _Decoded | None = None  # latest frame with time <= target
        ahead: _Decoded | None = None  # first frame with time > target
        exhausted = False
        rotation_known = False
        gone: list[float] = []
        corrupt = 0

        def pull() -> _Decoded | None:
            nonlocal exhausted
            try:
                return next(source)
            except StopIteration:
                exhausted = True
                return None

        first = pull()
        if first is not None and first.frame.pts is None:
            self._seekable = False  # no timestamps: after a seek nobody knows where we are
        if first is not None and first.frame.pts is not None and info.fps:
            if 0 < first.time <= 2.5 / info.fps:
                self._origin = first.frame.pts
                first.time = 0.0
        ahead = first
        margin = 3.0 / info.fps if info.fps else 0.1  # MP4 seeks by decode time, which leads

        for i, t in enumerate(planned):
            nxt = planned[i + 1] if i + 1 < len(planned) else max(info.duration, t)
            if ahead is not None and ahead.time <= t + _EPS:
                held, ahead = ahead, None
            pos = held.time if held is not None else None
            beyond = ahead is None and (held is None or t > held.time + held.span)
            if beyond and self._should_seek(pos, t):
                # after a seek nothing between ``held`` and the landing point has been decoded
                held, ahead = None, None
                errors_before = self.decode_errors
                seek_ok = self._seek(t, margin)
                if not seek_ok:
                    self._restart_sequential()
                source.close()
                source = self._decode()
                exhausted = False
                landed = pull()

                def overshot() -> bool:  # landed after t with no decode error to explain it
                    return landed is not None and landed.time > t + _EPS and self.decode_errors == errors_before

                if seek_ok and overshot():
                    source.close()  # try again from well before the target ...
                    if self._seek(t, max(10.0, 2 * self._key_gap)):
                        source = self._decode()
                        landed = pull()
                    if overshot():
                        # ... and if that lands late too, seeking is broken here: decode from the start
                        source.close()
                        self._restart_sequential()
                        source = self._decode()
                        landed = pull()
                if landed is not None:
                    if landed.time <= t + _EPS:
                        held = landed
                    else:
                        ahead = landed
            while ahead is None and not exhausted:
                d = pull()
                if d is None:
                    break
                if d.time <= t + _EPS:
                    # keep the latest frame <= t (some files deliver slightly out of order)
                    if held is None or d.time >= held.time - _EPS:
                        held = d
                else:
                    ahead = d
            # which frame (if any) stands for time t
            chosen: _Decoded | None = None
            if held is not None and not self._lost(held, t, ahead):
                chosen = held
            elif held is None and ahead is not None and ahead.time < (t + nxt) / 2:
                if not any(e <= t + _EPS for e in self._errors):
                    chosen = ahead
            if chosen is None:
                gone.append(t)
                continue
            image, rotation = chosen.image(self._rotation_tag)
            if not rotation_known:
                self.info = replace(self.info, rotation=rotation)
                rotation_known = True
            try:
                corrupt += bool(chosen.frame.is_corrupt)
            except Exception:
                pass
            index = int(round(chosen.time * info.fps)) if info.fps else self.yielded
            self.yielded += 1
            yield Frame(image=image, time=chosen.time, index=index, target=t)

        source.close()
        self._finish(gone, corrupt)

    def _finish(self, gone: list[float], corrupt: int) -> None:
        n, k = len(self.planned), self.yielded
        name = self.path.name
        if k < n:
            shown = ", ".join(f"{x:.2f}" for x in gone[:8]) + (", ..." if len(gone) > 8 else "")
            reasons = [f"no decodable frame at t = {shown} s"]
            if self.decode_errors:
                reasons.append(f"{self.decode_errors} packets failed to decode")
            if self._demux_error:
                reasons.append(f"the container breaks off ({self._demux_error})")
            last = self._last_time
            if last is not None and gone and min(gone) > last:
                quiet = not any(e > last for e in self._errors)
                reasons.append(f"nothing decodes after t = {last:.2f} s{' (truncated?)' if quiet else ''}")
            if k == 0:
                raise VideoError(f"{self.path}: no frame could be decoded ({'; '.join(reasons)})")
            self.warnings.append(f"{name}: used {k} of {n} planned frames ({'; '.join(reasons)})")
        elif self.decode_errors:
            self.warnings.append(
                f"{name}: {self.decode_errors} packets failed to decode; no sampled time was affected"
            )
        if corrupt:
            self.warnings.append(f"{name}: {corrupt} sampled frames are flagged corrupt by the decoder")


def read_frames(
    path: str | os.PathLike,
    *,
    fps: float | None = None,
    frames: int | None = None,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
) -> FrameStream:
    """Stream the sampled frames of ``path`` (1 fps capped at 16 by default).

    Opening errors (:class:`VideoError`, ``FileNotFoundError``, ``ValueError``
    for a bad plan) are raised here; a file from which no frame decodes
    raises :class:`VideoError` from the iteration.  ``stream.warnings`` is
    complete once the stream is exhausted.
    """
    return FrameStream(path, fps=fps, frames=frames, max_frames=max_frames)


def sample_video(
    path: str | os.PathLike,
    *,
    fps: float | None = None,
    frames: int | None = None,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
) -> SampledVideo:
    """Decode the sampled frames of ``path`` into a :class:`SampledVideo`."""
    with read_frames(path, fps=fps, frames=frames, max_frames=max_frames) as stream:
        got = list(stream)
        return SampledVideo(
            frames=[f.image for f in got],
            times=[f.time for f in got],
            info=stream.info,
            warnings=list(stream.warnings),
            indices=[f.index for f in got],
            planned=list(stream.planned),
        )
