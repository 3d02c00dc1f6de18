"""Safe image decoding: every failure is a ``MediaError`` naming the file and the reason.

Handles EXIF orientation, every common mode (RGB, L, LA, P, RGBA, CMYK, I;16, 1-bit, ...),
multi-frame files (first frame), and caps the pixel count against decompression bombs.
Transparent images are composited on white, so a logo on a transparent canvas is judged as it
is usually shown, not on whatever colour the hidden pixels happen to hold.
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 0.18 gigapixels: a 15000 x 12000 photo still decodes; a bomb (or a 100k x 100k PNG) does not.
DEFAULT_MAX_PIXELS = 180_000_000


class MediaError(ValueError):
    """An input could not be turned into pixels; the message names the file and the reason."""


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path or a PIL image -> an upright RGB ``PIL.Image`` (decoded fully, file closed)."""
    if isinstance(source, Image.Image):
        return to_rgb(_first_frame(source))
    path = Path(os.fspath(source))
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if path.is_dir():
        raise MediaError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    try:
        with _open_header(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise MediaError(_too_large(path, width * height, max_pixels, f"{width}x{height} = "))
            with warnings.catch_warnings():
                # Our own cap was checked above; Pillow's global one must not second-guess it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                frame = _first_frame(im)
                frame.load()
                image = ImageOps.exif_transpose(frame)
                return to_rgb(image)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(_too_large(path, None, max_pixels)) from None
    except UnidentifiedImageError:
        raise MediaError(f"{path}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"{path}: corrupt or truncated image ({exc})") from None


_PIL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _open_header(path: Path):
    """``Image.open`` (a header read, nothing decoded) without Pillow's global bomb limit.

    Pillow's limit (89 MP warning, 179 MP error) would refuse genuine large photos that
    ``max_pixels`` allows, with a message that ignores it; the caller checks ``max_pixels``
    against the header's size right after. The lock keeps concurrent opens from restoring each
    other's limit; decoding happens outside it.
    """
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    with im:
        yield im


def _too_large(path: Path, pixels: int | None, max_pixels: int, size: str = "") -> str:
    amount = f"{size}{pixels:,} pixels" if pixels is not None else "more than twice that many pixels"
    return (f"{path}: {amount} exceeds the cap of {max_pixels:,} "
            "(possible decompression bomb; raise --max-pixels if the file is genuine)")


def _first_frame(im: Image.Image) -> Image.Image:
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    return im


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    mode = image.mode
    if mode == "RGB":
        return image.copy() if image.readonly else image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / integer / float greyscale: scale the full range to 8 bits instead of clipping.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
