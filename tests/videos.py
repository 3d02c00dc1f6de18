"""Helpers that write small synthetic test videos with PyAV.

Every frame carries its own identity, so a test can tell exactly WHICH frame a
decoder handed back:

* the top band holds the frame number as 16 black/white blocks (two rows of
  eight, most significant bit first);
* the rest of the frame is filled with a colour that changes every second
  (``PALETTE[int(t) % len(PALETTE)]``), the "burned-in colour per second".

``read_code`` recovers the frame number from a decoded RGB image, and
``second_colour`` the palette entry.  The blocks survive lossy coding at
the tiny sizes used here (64x48, 32x24) because the encoders are run at high
quality.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import av
import numpy as np

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 25),  # red
    (25, 200, 25),  # green
    (25, 25, 230),  # blue
    (230, 230, 25),  # yellow
    (230, 25, 230),  # magenta
    (25, 230, 230),  # cyan
    (240, 140, 20),  # orange
    (130, 30, 200),  # purple
    (120, 120, 120),  # grey
    (250, 190, 190),  # pink
)

BITS = 16

# encoder name -> (container-independent) options giving near-lossless output
_ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"crf": "8", "preset": "veryfast"},
    "libx265": {"crf": "8", "preset": "ultrafast", "x265-params": "log-level=error"},
    "libvpx-vp9": {"crf": "4", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "libvpx": {"crf": "4", "b": "2M", "deadline": "realtime", "cpu-used": "8"},
    "libsvtav1": {"crf": "4", "preset": "10"},
    "libaom-av1": {"crf": "10", "cpu-used": "8"},
    "mpeg4": {"qscale": "2"},
    "mjpeg": {"qscale": "2"},
    "flv": {"qscale": "2"},
    "mpeg2video": {"qscale": "2"},
}

_PIX_FMT = {"mjpeg": "yuvj420p", "png": "rgb24", "ffv1": "yuv444p"}


def encoder_available(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def code_frame(number: int, second: int, width: int, height: int) -> np.ndarray:
    """RGB frame: frame number in blocks on top, colour of the second below."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = PALETTE[second % len(PALETTE)]
    block = width // 8
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        on = (number >> (BITS - 1 - bit)) & 1
        img[row * block : (row + 1) * block, col * block : (col + 1) * block] = 255 if on else 0
    return img


def read_code(image) -> int:
    """Frame number burned in by :func:`code_frame` (``image``: PIL or array)."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    width = arr.shape[1]
    block = width // 8
    number = 0
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        m = block // 4  # stay away from the block edges (ringing)
        patch = arr[row * block + m : (row + 1) * block - m, col * block + m : (col + 1) * block - m]
        number = (number << 1) | int(patch.mean() > 127)
    return number


def second_colour(image) -> int:
    """Index into PALETTE of the colour below the code band."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image).astype(np.float64)
    block = arr.shape[1] // 8
    mean = arr[2 * block + 2 :, 2:-2].reshape(-1, 3).mean(axis=0)
    dist = [float(((mean - np.array(c)) ** 2).sum()) for c in PALETTE]
    return int(np.argmin(dist))


def write_video(
    path: Path,
    *,
    times: Sequence[float] | None = None,
    duration: float | None = None,
    fps: float = 25,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    gop: int | None = None,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    frames: Iterable[np.ndarray] | None = None,
) -> list[float]:
    """Write a coded clip; return the presentation time of every frame.

    Constant frame rate: pass ``duration`` and ``fps`` (frame k at k/fps).
    Variable frame rate: pass ``times`` (seconds, increasing, millisecond
    resolution); the stream then uses a 1/1000 time base.  Frame k carries
    code k and the colour of second ``int(times[k])``.
    """
    width, height = size
    if times is None:
        assert duration is not None
        n = int(round(duration * fps))
        rate = Fraction(fps).limit_denominator(1001)
        times_list = [k / float(rate) for k in range(n)]
        time_base = 1 / rate
        pts = list(range(n))
    else:
        times_list = [float(t) for t in times]
        rate = None
        time_base = Fraction(1, 1000)
        pts = [int(round(t * 1000)) for t in times_list]
    container = av.open(str(path), "w", options=container_options or {})
    try:
        stream = container.add_stream(codec, rate=rate, options={**_ENCODER_OPTIONS.get(codec, {}), **(options or {})})
        stream.width, stream.height = width, height
        stream.pix_fmt = _PIX_FMT.get(codec, "yuv420p")
        stream.codec_context.time_base = time_base
        if rate is None:
            stream.time_base = time_base
        if gop is not None:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        source = iter(frames) if frames is not None else None
        for k, (p, t) in enumerate(zip(pts, times_list)):
            arr = next(source) if source is not None else code_frame(k, int(t), width, height)
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = p
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return times_list


def write_audio_only(path: Path, *, seconds: float = 1.0, codec: str = "aac", rate: int = 16000) -> None:
    """An audio-only file (a 440 Hz tone), e.g. ``.m4a`` or ``.mka``."""
    container = av.open(str(path), "w")
    try:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        n = int(seconds * rate)
        chunk = 1024
        for start in range(0, n, chunk):
            t = np.arange(start, min(n, start + chunk)) / rate
            samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


def reencode(src: Path, dst: Path, bitrate: int) -> Path:
    """``src`` re-encoded with libx264 at ``bitrate`` bit/s (same size and frame rate)."""
    if dst.exists() and dst.stat().st_size > 0:
        return dst
    with av.open(str(src)) as inp:
        vin = inp.streams.video[0]
        with av.open(str(dst), "w") as out:
            vout = out.add_stream("libx264", rate=vin.average_rate)
            vout.width, vout.height, vout.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
            vout.bit_rate = bitrate
            vout.options = {"preset": "veryfast"}
            rate = Fraction(vin.average_rate)
            vout.codec_context.time_base = 1 / rate
            for k, frame in enumerate(inp.decode(vin)):
                frame = frame.reformat(format="yuv420p")
                frame.pts, frame.time_base = k, 1 / rate
                for packet in vout.encode(frame):
                    out.mux(packet)
            for packet in vout.encode():
                out.mux(packet)
    return dst
