"""Train/test overlap check by content.

Two hashes per file: the sha256 of its bytes (byte-identical copies) and a sha256 of its decoded
pixels (size, a canonical mode and the pixel bytes), so that an image re-encoded losslessly (PNG
-> BMP, a PNG saved again with other compression settings, a palette PNG saved as RGB) still
matches. Files Pillow cannot decode (videos, say) are compared by their bytes only. Upstream
KADID-10k once shared 1,844 images between its train and test files: this is the check that
finds that.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..wheels import sha256_of
from .labels import LabelRecord, LabelSet

__all__ = ["Overlap", "OverlapReport", "ContentHash", "content_hash", "find_overlaps", "check_overlap",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm"}


@dataclass(frozen=True)
class ContentHash:
    path: str
    file_sha256: str
    pixel_sha256: str | None  # None when Pillow could not decode the file


@dataclass(frozen=True)
class Overlap:
    """A pair of files with the same content. ``kind``: ``"file"`` (identical bytes) or ``"pixels"``
    (different bytes, identical decoded pixels)."""

    a: str
    b: str
    kind: str


def _pixel_sha256(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:  # stored pixels; EXIF orientation is not applied
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                mode, data = im.mode, im.tobytes()
            else:
                has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
                mode = "RGBA" if has_alpha else "RGB"
                conv = im.convert(mode)
                if mode == "RGBA" and conv.getextrema()[3] == (255, 255):
                    mode, conv = "RGB", conv.convert("RGB")  # fully opaque alpha carries no content
                data = conv.tobytes()
            h = hashlib.sha256(f"{im.size[0]}x{im.size[1]}:{mode}:".encode())
            h.update(data)
            return h.hexdigest()
    except Exception:  # noqa: BLE001 - anything Pillow cannot decode is compared by bytes only
        return None


def content_hash(path: str | os.PathLike, *, pixels: bool = True) -> ContentHash:
    p = Path(path)
    return ContentHash(str(p), sha256_of(p), _pixel_sha256(p) if pixels else None)


def _paths(source: str | os.PathLike | LabelSet | Iterable[LabelRecord] | Iterable[str],
           images_root: str | os.PathLike | None) -> tuple[list[Path], list[str]]:
    """(existing files, missing entries) of a folder, a label set, records or paths."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        return files, []
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    items = list(source.records if isinstance(source, LabelSet) else source)
    if items and isinstance(items[0], LabelRecord):
        from .labels import resolve

        res = resolve(items, images_root)
        return [Path(r.path) for r in res.records], res.missing_paths
    root = Path(images_root) if images_root is not None else None
    found, missing = [], []
    for it in items:
        p = Path(it)
        if not p.is_absolute() and root is not None:
            p = root / p
        (found if p.is_file() else missing).append(p if p.is_file() else str(it))
    return found, missing


@dataclass
class OverlapReport:
    overlaps: list[Overlap]
    missing_a: list[str]
    missing_b: list[str]
    n_a: int
    n_b: int

    def __len__(self) -> int:
        return len(self.overlaps)

    def __iter__(self):
        return iter(self.overlaps)


def find_overlaps(a, b, *, images_root_a: str | os.PathLike | None = None,
                  images_root_b: str | os.PathLike | None = None, pixels: bool = True) -> list[Overlap]:
    """All pairs (file in ``a``, file in ``b``) with the same content; see :func:`check_overlap`."""
    return check_overlap(a, b, images_root_a=images_root_a, images_root_b=images_root_b, pixels=pixels).overlaps


def check_overlap(a, b, *, images_root_a: str | os.PathLike | None = None,
                  images_root_b: str | os.PathLike | None = None, pixels: bool = True) -> OverlapReport:
    """All pairs (file in ``a``, file in ``b``) with the same content, plus what could not be found.

    ``a``/``b``: a folder (searched recursively for images), a :class:`LabelSet`, a list of
    :class:`LabelRecord` (resolved under ``images_root_*``) or a list of paths. The same file on both
    sides is reported too (kind ``"file"``). Entries that do not exist are listed in
    ``missing_a``/``missing_b`` rather than dropped silently.
    """
    files_a, miss_a = _paths(a, images_root_a)
    files_b, miss_b = _paths(b, images_root_b)
    cache: dict[str, ContentHash] = {}

    def h(p: Path) -> ContentHash:
        key = str(p.resolve())
        if key not in cache:
            cache[key] = content_hash(p, pixels=pixels)
        return cache[key]

    by_file: dict[str, list[str]] = {}
    by_pix: dict[str, list[str]] = {}
    for p in files_a:
        ch = h(p)
        by_file.setdefault(ch.file_sha256, []).append(str(p))
        if ch.pixel_sha256:
            by_pix.setdefault(ch.pixel_sha256, []).append(str(p))
    out: list[Overlap] = []
    seen: set[tuple[str, str]] = set()
    for p in files_b:
        ch = h(p)
        for q in by_file.get(ch.file_sha256, []):
            if (q, str(p)) not in seen:
                seen.add((q, str(p)))
                out.append(Overlap(q, str(p), "file"))
        if ch.pixel_sha256:
            for q in by_pix.get(ch.pixel_sha256, []):
                if (q, str(p)) not in seen:
                    seen.add((q, str(p)))
                    out.append(Overlap(q, str(p), "pixels"))
    return OverlapReport(out, miss_a, miss_b, len(files_a), len(files_b))
