"""Tell images from videos by their bytes, not their names.

``kind_of(path)`` reads the first few hundred bytes of a file and matches the
signatures ("magic numbers") of the common still-image and video container
formats.  The file extension is consulted only when the content matches no
known signature (a tie-breaker for formats without magic, such as Targa
images or raw elementary video streams) -- a PNG called ``clip.mp4`` is an
image, an MP4 called ``photo.jpg`` is a video.

Deliberate choices:

* Animated GIF (and APNG, animated WebP) count as images: the image path
  uses their first frame.
* ISO-BMFF files (``ftyp``) are images when the brand says HEIF/AVIF
  (``heic``, ``mif1``, ``avif`` ...), audio (-> ``"unknown"``) for the
  iTunes audio brands (``M4A``...), video otherwise.
* Containers that may hold audio only (Matroska/WebM, AVI, ASF, MPEG-TS,
  FLV, Ogg with Theora) report ``"video"``; whether a video stream really is
  inside is for the video reader to say (it raises ``VideoError`` naming
  the reason).  RIFF/WAVE, Ogg without Theora, MP3, FLAC and friends are
  ``"unknown"``.
* Text files are ``"unknown"`` whatever their extension.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["image", "video", "unknown"]

HEAD_BYTES = 1024

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .webp .tif .tiff .bmp .dib .jp2 .j2k .jpf .jpx .j2c"
    " .heic .heif .avif .jxl .ico .tga .ppm .pgm .pbm .pnm .qoi .psd .dds .pcx .sgi .ras".split()
)
VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .qt .mkv .webm .avi .ts .mts .m2ts .m2t .flv .f4v .wmv .asf .mpg .mpeg .m2v .mpv"
    " .vob .3gp .3g2 .ogv .y4m .ivf .h264 .264 .avc .h265 .265 .hevc .rm .rmvb .dv .mxf .nut".split()
)

# ISO-BMFF brands of still-image formats (HEIF, AVIF, JPEG 2000 in ISO-BMFF, ...)
_IMAGE_BRANDS = frozenset(
    b"heic heix heim heis hevc hevx mif1 mif2 msf1 avif avis avio jp2 jpx jpm".split()
)
# ... and of audio-only files (iTunes / Flash audio)
_AUDIO_BRANDS = frozenset([b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "])
# QuickTime files without ftyp start with one of these atoms
_QT_ATOMS = frozenset([b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot", b"uuid"])


@dataclass(frozen=True)
class Sniffed:
    """What :func:`detect` found: the kind, a short format name and how it was decided."""

    kind: Kind
    format: str  # e.g. "png", "mp4", "matroska", "text", "empty", "unknown"
    by: Literal["content", "extension", "none"]


def _brand_kind(head: bytes) -> tuple[Kind, str]:
    """Kind of an ISO-BMFF file from the major brand of its ftyp box."""
    major = head[8:12]
    if major.strip() in _IMAGE_BRANDS:
        return "image", "jpeg2000" if major.strip() in (b"jp2", b"jpx", b"jpm") else "heif"
    if major in _AUDIO_BRANDS:
        return "unknown", "m4a"
    if major == b"qt  ":
        return "video", "mov"
    return "video", "mp4"


def _is_text(head: bytes) -> bool:
    if not head:
        return False
    if head.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return True
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end is fine
        if exc.start < len(head) - 4:
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t\f" for ch in text)
    return printable >= 0.95 * max(1, len(text))


def _match(head: bytes) -> tuple[Kind, str] | None:
    """Signature match on the first bytes; None when nothing matches."""
    h = head
    # --- still images -----------------------------------------------------------------
    if h.startswith(b"\xff\xd8\xff"):
        return "image", "jpeg"
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if h[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "gif"
    if h[:4] == b"RIFF" and h[8:12] == b"WEBP":
        return "image", "webp"
    if h[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "image", "tiff"
    if h[:2] == b"BM" and len(h) >= 26 and int.from_bytes(h[14:18], "little") in (12, 16, 40, 52, 56, 64, 108, 124):
        return "image", "bmp"
    if h.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return "image", "jpeg2000"
    if h.startswith(b"\xff\x4f\xff\x51"):
        return "image", "jpeg2000"
    if h.startswith(b"\xff\x0a") or h.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "image", "jpegxl"
    if h.startswith(b"qoif"):
        return "image", "qoi"
    if h.startswith(b"8BPS"):
        return "image", "psd"
    if h.startswith(b"\x00\x00\x01\x00") and len(h) > 6 and h[4] > 0 and h[5] == 0:
        return "image", "ico"
    # --- video containers -----------------------------------------------------------------
    if h[4:8] == b"ftyp":
        return _brand_kind(h)
    if h[4:8] in _QT_ATOMS and int.from_bytes(h[0:4], "big") >= 8:
        return "video", "mov"
    if h.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "webm" if b"webm" in h[:64] else "matroska"
    if h[:4] == b"RIFF":
        form = h[8:12]
        if form in (b"AVI ", b"AVIX", b"AVI\x19"):
            return "video", "avi"
        if form in (b"WAVE", b"RMID", b"sfbk"):
            return "unknown", "wav" if form == b"WAVE" else "riff"
        return None  # unknown RIFF form: let the extension decide
    if h.startswith(b"FLV\x01"):
        return "video", "flv"
    if h.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6\xd9\x00\xaa\x00\x62\xce\x6c"):
        return "video", "asf"
    if h.startswith(b"\x00\x00\x01\xba"):
        return "video", "mpeg-ps"
    if h.startswith(b"\x00\x00\x01\xb3"):
        return "video", "mpeg-video"
    if len(h) >= 3 * 188 and h[0] == 0x47 and h[188] == 0x47 and h[376] == 0x47:
        return "video", "mpegts"
    if len(h) >= 3 * 192 and h[4] == 0x47 and h[196] == 0x47 and h[388] == 0x47:
        return "video", "m2ts"
    if h.startswith(b"OggS"):
        return ("video", "ogg") if b"\x80theora" in h or b"fishead" in h else ("unknown", "ogg")
    if h.startswith(b"DKIF"):
        return "video", "ivf"
    if h.startswith(b"YUV4MPEG2"):
        return "video", "y4m"
    if h.startswith(b".RMF"):
        return "video", "realmedia"
    if h.startswith(b"\x06\x0e\x2b\x34\x02\x05\x01\x01"):
        return "video", "mxf"
    if h.startswith(b"nut/multimedia container"):
        return "video", "nut"
    # --- audio that must not be mistaken for anything else ------------------------------
    if h.startswith((b"ID3", b"fLaC", b"#!AMR", b"MThd", b"FORM")) or h[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xf1", b"\xff\xf9"):
        return "unknown", "audio"
    return None


def detect(path: str | os.PathLike) -> Sniffed:
    """Sniff ``path``: signature first, then (text check, then) the extension."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    if not head:
        return Sniffed("unknown", "empty", "none")
    found = _match(head)
    if found is not None:
        return Sniffed(found[0], found[1], "content")
    if _is_text(head):
        return Sniffed("unknown", "text", "content")
    ext = p.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return Sniffed("image", ext.lstrip("."), "extension")
    if ext in VIDEO_EXTENSIONS:
        return Sniffed("video", ext.lstrip("."), "extension")
    return Sniffed("unknown", "unknown", "none")


def kind_of(path: str | os.PathLike) -> Kind:
    """``"image"``, ``"video"`` or ``"unknown"``, decided by the file's content.

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` like ``open``.
    """
    return detect(path).kind
