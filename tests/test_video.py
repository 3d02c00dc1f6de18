"""Video decoding, sampling and content sniffing (qalign.media.video / qalign.media.sniff).

Synthetic clips are written with PyAV at tiny sizes; each frame carries its
frame number (blocks) and a colour per second, so every test checks WHICH
frame came back, not just how many.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import pytest

av = pytest.importorskip("av")
pytest.importorskip("numpy")
from PIL import Image, features  # noqa: E402

from qalign.media import sniff, video  # noqa: E402
from qalign.media.video import VideoError, plan_times, probe, read_frames, sample_video  # noqa: E402

from videos import PALETTE, encoder_available, read_code, second_colour, write_audio_only, write_video  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VIDEOS = DATA / "videos"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def vdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def clip10(vdir) -> Path:
    """10 s, 25 fps, 64x48 H.264 MP4 with B-frames, a keyframe every 2 s."""
    path = vdir / "clip10.mp4"
    write_video(path, duration=10, fps=25, gop=50)
    return path


@pytest.fixture(scope="session")
def long_clip(vdir) -> Path:
    """10 minutes at 2 fps, 32x24, keyframe every 10 s: 1200 frames."""
    path = vdir / "long.mp4"
    write_video(path, duration=600, fps=2, size=(32, 24), gop=20)
    return path


VFR_TIMES = [0.0, 0.1, 0.15, 0.9, 1.7, 1.75, 2.5, 3.2, 3.25, 3.3, 4.8, 5.0, 5.5, 6.2, 6.9, 7.0]


@pytest.fixture(scope="session", params=["mp4", "mkv"])
def vfr_clip(vdir, request) -> Path:
    path = vdir / f"vfr.{request.param}"
    write_video(path, times=VFR_TIMES)
    return path


def _codes(images) -> list[int]:
    return [read_code(im) for im in images]


# --------------------------------------------------------------------------- plans


def test_plan_fps_is_qalign_one_per_second():
    assert plan_times(10.0) == [float(k) for k in range(10)]
    assert plan_times(10.0, fps=1) == plan_times(10.0)
    # upstream count floor(duration): 10.96 s -> 10 frames, 4.004 s (120 frames at 29.97) -> 4
    assert len(plan_times(10.96)) == 10
    assert len(plan_times(120 / (30000 / 1001))) == 4
    assert plan_times(3.0, fps=2) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_plan_short_clip_gives_one_frame():
    assert plan_times(0.5) == [0.0]
    assert plan_times(0.0) == [0.0]
    assert plan_times(0.5, frames=2) == [0.125, 0.375]


def test_plan_frames_are_segment_centres():
    assert plan_times(10.0, frames=8) == pytest.approx([0.625 + 1.25 * i for i in range(8)])
    assert plan_times(10.0, frames=4) == [1.25, 3.75, 6.25, 8.75]
    # frames mode is bounded by N itself, max_frames does not shrink it
    assert len(plan_times(100.0, frames=20, max_frames=16)) == 20


def test_plan_cap_subsamples_the_fps_grid():
    times = plan_times(900.0)  # 15 minutes: upstream would take 900 frames
    assert len(times) == video.DEFAULT_MAX_FRAMES == 16
    assert all(t == int(t) for t in times)  # still upstream's 1 fps instants
    assert times == sorted(set(times))
    assert times[0] < 60 and times[-1] > 840  # spread over the whole clip
    assert plan_times(10.0, max_frames=4) == [1.0, 3.0, 6.0, 8.0]
    assert len(plan_times(900.0, max_frames=None)) == 900


@pytest.mark.parametrize("kwargs", [dict(fps=1, frames=8), dict(frames=0), dict(fps=0), dict(fps=-1), dict(max_frames=0)])
def test_plan_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        plan_times(10.0, **kwargs)


# --------------------------------------------------------------------------- sampling


def test_fps1_takes_the_frame_at_each_second(clip10):
    sv = sample_video(clip10)
    assert sv.planned == [float(k) for k in range(10)]
    assert sv.indices == [25 * k for k in range(10)]
    assert _codes(sv.frames) == [25 * k for k in range(10)]
    assert [second_colour(im) for im in sv.frames] == list(range(10))
    assert sv.times == pytest.approx([float(k) for k in range(10)])
    assert sv.warnings == []
    assert all(im.mode == "RGB" and im.size == (64, 48) for im in sv.frames)
    assert sv.info.duration == pytest.approx(10.0)
    assert sv.info.fps == pytest.approx(25.0)
    assert sv.info.frames == 250
    assert sv.info.codec == "h264"


def test_frames8_takes_segment_centres(clip10):
    sv = sample_video(clip10, frames=8)
    expected = [int((i + 0.5) * 10 / 8 * 25) for i in range(8)]  # frame on screen at each centre
    assert expected == [15, 46, 78, 109, 140, 171, 203, 234]
    assert _codes(sv.frames) == expected
    assert sv.indices == expected
    assert [second_colour(im) for im in sv.frames] == [e // 25 for e in expected]


def test_max_frames_cap(clip10):
    sv = sample_video(clip10, max_frames=4)
    assert sv.planned == [1.0, 3.0, 6.0, 8.0]
    assert _codes(sv.frames) == [25, 75, 150, 200]


def test_read_frames_streams_frame_objects(clip10):
    with read_frames(clip10, fps=2, max_frames=None) as stream:
        frames = list(stream)
    assert [f.target for f in frames] == [k / 2 for k in range(20)]
    assert [f.index for f in frames] == [int(f.target * 25) for f in frames]
    assert [read_code(f.image) for f in frames] == [f.index for f in frames]
    assert all(isinstance(f.image, Image.Image) for f in frames)


def test_vfr_is_sampled_by_time(vfr_clip):
    sv = sample_video(vfr_clip)
    # the frame on screen at t = 0, 1, 2, 3, 4: the last one whose pts <= t
    expected = [max(k for k, ft in enumerate(VFR_TIMES) if ft <= t) for t in sv.planned]
    assert len(sv.planned) == int(sv.info.duration) >= 6
    assert expected[:6] == [0, 3, 5, 6, 9, 11]  # 3.3 s is held until 4.8 s
    assert _codes(sv.frames) == expected
    assert sv.times == pytest.approx([VFR_TIMES[k] for k in expected], abs=1e-3)
    assert [second_colour(im) for im in sv.frames] == [int(VFR_TIMES[k]) for k in expected]
    assert sv.warnings == []
    sv4 = sample_video(vfr_clip, frames=4)
    d = sv4.info.duration
    expected4 = [max(k for k, ft in enumerate(VFR_TIMES) if ft <= (i + 0.5) * d / 4) for i in range(4)]
    assert _codes(sv4.frames) == expected4


def test_half_second_clip_gives_a_frame(vdir):
    path = vdir / "half.mp4"
    write_video(path, duration=0.5, fps=25)
    sv = sample_video(path)
    assert len(sv.frames) == 1 and _codes(sv.frames) == [0]
    sv3 = sample_video(path, frames=3)
    assert _codes(sv3.frames) == [int((i + 0.5) * 0.5 / 3 * 25) for i in range(3)]


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames(vdir, rotation):
    path = vdir / f"rot{rotation}.mp4"
    write_video(path, duration=1, fps=10, rotation=rotation)
    info = probe(path)
    assert info.rotation == rotation
    assert (info.width, info.height) == (64, 48)
    sv = sample_video(path, frames=2)
    assert sv.info.rotation == rotation
    im = sv.frames[0]
    if rotation in (90, 270):
        assert im.size == (48, 64) == info.display_size  # portrait
    else:
        assert im.size == (64, 48)
    # undo a counter-clockwise rotation by `rotation`: the code reads again only if the
    # frame was turned the right way
    back = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
    assert read_code(im.transpose(back[rotation])) == 2


# name, extension, encoder, codec family (decoder_support key), size
CODECS = [
    ("mp4-h264", "mp4", "libx264", "h264", (64, 48)),
    ("mkv-h264", "mkv", "libx264", "h264", (64, 48)),
    ("mov-h264", "mov", "libx264", "h264", (64, 48)),
    ("ts-h264", "ts", "libx264", "h264", (64, 48)),
    ("mp4-hevc", "mp4", "libx265", "hevc", (64, 48)),
    ("webm-vp9", "webm", "libvpx-vp9", "vp9", (64, 48)),
    ("webm-vp8", "webm", "libvpx", "vp8", (64, 48)),
    ("mkv-av1", "mkv", "libsvtav1", "av1", (64, 64)),
    ("avi-mpeg4", "avi", "mpeg4", "mpeg4", (64, 48)),
    ("avi-mjpeg", "avi", "mjpeg", "mjpeg", (64, 48)),
    ("mpg-mpeg2", "mpg", "mpeg2video", "mpeg2video", (64, 48)),  # MPEG-PS: duration by scanning
    ("raw-h264", "h264", "libx264", "h264", (64, 48)),  # elementary stream: no timestamps at all
]


@pytest.mark.parametrize("name,ext,encoder,family,size", CODECS, ids=[c[0] for c in CODECS])
def test_containers_and_codecs(vdir, monkeypatch, name, ext, encoder, family, size):
    if not encoder_available(encoder):
        pytest.skip(f"this PyAV wheel has no {encoder} encoder")
    decoder = video.decoder_support().get(family)
    if decoder is None:
        pytest.skip(f"this PyAV wheel has no {family} decoder")
    monkeypatch.setenv("SVT_LOG", "1")  # keep SVT-AV1 quiet
    path = vdir / f"{name}.{ext}"
    write_video(path, duration=3, fps=10, size=size, codec=encoder, gop=10)
    assert sniff.kind_of(path) == "video"
    info = probe(path)
    assert info.codec == family or (family == "mjpeg" and info.codec == "mjpeg")
    assert (info.width, info.height) == size
    assert info.duration == pytest.approx(3.0, abs=0.15)
    assert info.fps == pytest.approx(10.0, rel=0.01)
    sv = sample_video(path)
    assert _codes(sv.frames) == sv.indices == [0, 10, 20]
    sv3 = sample_video(path, frames=3)
    assert _codes(sv3.frames) == [5, 15, 25]
    assert sv.warnings == [] and sv3.warnings == []


def test_decoder_support_reports_the_wheel():
    support = video.decoder_support()
    assert {"h264", "hevc", "vp9", "av1"} <= set(support)
    assert support["h264"] is not None  # every PyAV wheel decodes H.264
    for family, decoder in support.items():
        if decoder is not None:
            assert av.codec.Codec(decoder, "r").type == "video"
    # FFmpeg's native "av1" decoder needs hardware: never reported as the software path
    assert support["av1"] != "av1"


# --------------------------------------------------------------------------- long clips, bounded work


def test_long_clip_is_capped_and_decodes_little(long_clip):
    info = probe(long_clip)
    assert info.duration == pytest.approx(600.0)
    assert info.frames == 1200
    stream = read_frames(long_clip)
    first = next(stream)  # lazy: the first frame does not decode the clip
    assert stream.decoded < 25
    frames = [first, *stream]
    assert len(stream.planned) == 16 and len(frames) == 16
    assert [read_code(f.image) for f in frames] == [round(t * 2) for t in stream.planned]
    # seeks instead of decoding the clip: <= one keyframe interval (20 frames) per sample
    assert stream.seeks >= 10
    assert stream.decoded <= 16 * 22 < 1200
    assert stream.warnings == []


def test_frames_mode_on_long_clip_seeks(long_clip):
    sv = sample_video(long_clip, frames=8)
    assert _codes(sv.frames) == [int((i + 0.5) * 600 / 8 * 2) for i in range(8)]


def test_sequential_fallback_when_seeking_fails(clip10, monkeypatch):
    monkeypatch.setattr(video.FrameStream, "_seek", lambda self, target, margin: False)
    stream = read_frames(clip10, frames=4)
    frames = list(stream)
    assert [read_code(f.image) for f in frames] == [31, 93, 156, 218]
    assert stream.seeks == 0 and stream.decoded >= 219


def test_fallback_when_seek_lands_after_the_target(clip10, monkeypatch):
    real_seek = video.FrameStream._seek

    def overshooting(self, target, margin):  # a demuxer whose seeks land 3 s late
        return real_seek(self, target + 3.0, 0.0)

    monkeypatch.setattr(video.FrameStream, "_seek", overshooting)
    sv = sample_video(clip10, frames=4)
    assert _codes(sv.frames) == [31, 93, 156, 218]


# --------------------------------------------------------------------------- errors


def test_missing_file(vdir):
    with pytest.raises(FileNotFoundError):
        probe(vdir / "nope.mp4")


def test_zero_length_file(vdir):
    path = vdir / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4.*empty file"):
        sample_video(path)
    assert sniff.kind_of(path) == "unknown"


@pytest.mark.parametrize("name", ["notes.txt", "notes.mp4"])
def test_text_file_is_not_a_video(vdir, name):
    path = vdir / name
    path.write_text("frame rate: 25\n" * 50)
    with pytest.raises(VideoError, match=rf"{name}.*not a video"):
        sample_video(path)
    assert sniff.kind_of(path) == "unknown"


def test_ansi_art_is_not_a_video(vdir):
    """FFmpeg "decodes" .ans/.nfo/.txt files as video (its tty demuxer); CP437 art is not UTF-8 text."""
    path = vdir / "art.ans"
    path.write_bytes(b"\x1b[1;31m\xdb\xdb\xb2\xb1\xb0 \x1b[0m\xc9\xcd\xcd\xbb\r\n" * 40)
    assert sniff.kind_of(path) == "unknown"
    with av.open(str(path)) as c:
        assert c.format.name == "tty" and len(c.streams.video) == 1
    with pytest.raises(VideoError, match=r"art\.ans.*not a video.*tty"):
        sample_video(path)


def test_image_is_not_a_video(vdir):
    path = vdir / "still.mp4"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path, format="PNG")
    with pytest.raises(VideoError, match=r"still\.mp4.*still image"):
        probe(path)


@pytest.mark.parametrize("ext,codec", [("m4a", "aac"), ("mka", "libopus"), ("wav", "pcm_s16le")])
def test_audio_only_file(vdir, ext, codec):
    if not encoder_available(codec):
        pytest.skip(f"no {codec} encoder")
    path = vdir / f"tone.{ext}"
    write_audio_only(path, codec=codec)
    with pytest.raises(VideoError, match=rf"tone\.{ext}.*no video stream.*audio"):
        sample_video(path)


def test_unsupported_codec_is_named(vdir):
    path = vdir / "alien.avi"
    write_video(path, duration=0.4, fps=25, codec="mpeg4")
    data = path.read_bytes()
    assert data.count(b"FMP4") == 2  # the AVI stream handler and the BITMAPINFOHEADER
    path.write_bytes(data.replace(b"FMP4", b"QZQZ"))
    with pytest.raises(VideoError, match=r"alien\.avi.*unsupported video codec.*QZQZ"):
        probe(path)
    with pytest.raises(VideoError, match=r"QZQZ"):
        sample_video(path)


def test_truncated_mp4_without_index_is_an_error(vdir, clip10):
    path = vdir / "cut_noindex.mp4"  # the moov (index) is at the end and got cut off
    data = clip10.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(VideoError, match=r"cut_noindex\.mp4.*truncated or corrupt"):
        sample_video(path)


def _cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _complete_frames(path: Path, cut: int) -> int:
    """Frames of an MP4 whose data lies fully before byte ``cut``."""
    with av.open(str(path)) as c:
        return sum(1 for e in c.streams.video[0].index_entries if e.pos + e.size <= cut)


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_truncated_file_keeps_what_decodes(vdir, ext):
    src = vdir / f"whole.{ext}"
    options = {"movflags": "+faststart"} if ext == "mp4" else None  # index first, data after
    write_video(src, duration=10, fps=25, gop=25, container_options=options)
    path = _cut(src, vdir / f"cut.{ext}", 0.7)
    sv = sample_video(path)
    k = len(sv.frames)
    assert 1 <= k < 10
    assert _codes(sv.frames) == [25 * i for i in range(k)]  # the first K seconds, exactly
    assert len(sv.warnings) == 1
    assert f"used {k} of 10 planned frames" in sv.warnings[0]
    assert sv.warnings[0].startswith(f"cut.{ext}:")
    if ext == "mp4":
        complete = _complete_frames(src, int(src.stat().st_size * 0.7))
        assert k == (complete - 1) // 25 + 1  # every second whose frame is complete


def _corrupt(src: Path, dst: Path, lo: float, hi: float, seed: int = 0) -> Path:
    data = bytearray(src.read_bytes())
    a, b = int(len(data) * lo), int(len(data) * hi)
    rng = random.Random(seed)
    data[a:b] = rng.randbytes(b - a)
    dst.write_bytes(bytes(data))
    return dst


def test_corrupt_bytes_mid_stream_intra_codec(vdir):
    """MJPEG in AVI: every frame stands alone, so exactly the damaged seconds go missing."""
    src = vdir / "intra.avi"
    write_video(src, duration=10, fps=25, codec="mjpeg")
    path = _corrupt(src, vdir / "intra_bad.avi", 0.40, 0.60)
    with av.open(str(src)) as c:  # which frames had bytes in the damaged range
        size = src.stat().st_size
        a, b = int(size * 0.40), int(size * 0.60)
        damaged = {e.timestamp for e in c.streams.video[0].index_entries if e.pos + 8 + e.size > a and e.pos < b}
    seconds_hit = {s for s in range(10) if 25 * s in damaged}
    sv = sample_video(path)
    k = len(sv.frames)
    assert 0 < k < 10
    assert f"used {k} of 10 planned frames" in sv.warnings[-1]
    kept = _codes(sv.frames)
    assert kept == sv.indices  # every frame that came back is the right one
    assert {c // 25 for c in kept} == set(range(10)) - seconds_hit


def test_corrupt_bytes_mid_stream_h264(vdir, clip10):
    with av.open(str(clip10)) as c:  # garble the coded data of frames ~100-150 (4-6 s)
        entries = c.streams.video[0].index_entries
        lo, hi = entries[100].pos, entries[150].pos
    size = clip10.stat().st_size
    path = _corrupt(clip10, vdir / "clip10_bad.mp4", lo / size, hi / size)
    stream = read_frames(path)
    frames = list(stream)
    k = len(frames)
    assert 0 < k < 10
    assert stream.decode_errors > 0
    assert f"used {k} of 10 planned frames" in stream.warnings[-1]
    assert "packets failed to decode" in stream.warnings[-1]
    # frames before the damage are intact and the right ones; t = 4 and 5 are gone
    early = [f for f in frames if f.time < 4]
    assert [read_code(f.image) for f in early] == [f.index for f in early] == [0, 25, 50, 75]
    assert not {4.0, 5.0} & {f.target for f in frames}


def test_nothing_decodable_is_an_error(vdir):
    src = vdir / "png.avi"  # PNG frames: the decoder rejects every garbled one
    write_video(src, duration=4, fps=25, codec="png")
    data = bytearray(src.read_bytes())
    with av.open(str(src)) as c:  # (index entries are only valid while the file is open)
        chunks = [(e.pos + 8, e.size) for e in c.streams.video[0].index_entries]
    assert len(chunks) == 100
    rng = random.Random(1)
    for pos, n in chunks:  # garble every coded frame, keep the container intact
        data[pos : pos + n] = rng.randbytes(n)
    path = vdir / "garbled.avi"
    path.write_bytes(bytes(data))
    assert probe(path).frames == 100  # the container itself is fine
    assert _codes(sample_video(src).frames) == [0, 25, 50, 75]  # and so was the original
    with pytest.raises(VideoError, match=r"garbled\.avi.*no frame could be decoded.*failed to decode"):
        sample_video(path)


# --------------------------------------------------------------------------- sniffing


def _image_bytes(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 30)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _animated_gif() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (16, 12), c) for c in PALETTE[:3]]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


IMAGE_FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP", "JPEG2000"]


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_sniff_images_by_content(vdir, fmt):
    if fmt == "JPEG2000" and not features.check("jpg_2000"):
        pytest.skip("Pillow without OpenJPEG")
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow without WebP")
    data = _image_bytes(fmt)
    for name in (f"img.{fmt.lower()}", "img_named.mp4", "img_named.avi", "noext"):
        path = vdir / f"{fmt}-{name}"
        path.write_bytes(data)
        assert sniff.kind_of(path) == "image", (fmt, name)


def test_sniff_animated_gif_is_an_image(vdir):
    path = vdir / "anim.mp4"
    path.write_bytes(_animated_gif())
    assert sniff.kind_of(path) == "image"
    assert sniff.detect(path).format == "gif"


def test_sniff_videos_by_content(vdir, clip10):
    sources = {}
    for ext, codec in [("mp4", "libx264"), ("mkv", "libx264"), ("avi", "mpeg4"), ("mov", "libx264"),
                       ("ts", "libx264"), ("flv", "flv"), ("webm", "libvpx-vp9")]:
        if not encoder_available(codec):
            continue
        src = vdir / f"sniff_src.{ext}"
        write_video(src, duration=0.4, fps=25, codec=codec)
        sources[ext] = src.read_bytes()
    assert {"mp4", "mkv", "avi", "ts"} <= set(sources)
    for ext, data in sources.items():
        for name in (f"v.{ext}", "v_named.jpg", "v_named.png", "v_noext"):
            path = vdir / f"{ext}-{name}"
            path.write_bytes(data)
            assert sniff.kind_of(path) == "video", (ext, name)
    # and the misnamed ones still decode
    sv = sample_video(vdir / "mp4-v_named.jpg")
    assert _codes(sv.frames) == [0]


def test_sniff_unknowns_and_tie_breaks(vdir):
    cases = {
        "empty.mp4": b"",
        "text.mp4": b"hello, this is not a video\n" * 10,
        "text.png": "déjà vu, still text\n".encode() * 10,
    }
    for name, data in cases.items():
        (vdir / name).write_bytes(data)
        assert sniff.kind_of(vdir / name) == "unknown", name
    audio = vdir / "tone_sniff.wav"
    write_audio_only(audio, codec="pcm_s16le")
    assert sniff.kind_of(audio) == "unknown"
    # no signature: the extension breaks the tie
    blob = bytes(range(7, 250)) * 4
    for name, kind in [("raw.tga", "image"), ("raw.h264", "video"), ("raw.bin", "unknown")]:
        (vdir / name).write_bytes(blob)
        assert sniff.kind_of(vdir / name) == kind, name
        assert sniff.detect(vdir / name).by == ("none" if kind == "unknown" else "extension")


def test_sniff_heif_brand_is_an_image(vdir):
    ftyp = (24).to_bytes(4, "big") + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    (vdir / "photo.mp4").write_bytes(ftyp + b"\x00" * 64)
    assert sniff.kind_of(vdir / "photo.mp4") == "image"
    ftyp = (24).to_bytes(4, "big") + b"ftypisom" + b"\x00\x00\x02\x00" + b"isomiso2"
    (vdir / "movie.heic").write_bytes(ftyp + b"\x00" * 64)
    assert sniff.kind_of(vdir / "movie.heic") == "video"


# --------------------------------------------------------------------------- the real clips


def _real_rows() -> list[dict]:
    table = VIDEOS / "VIDEOS.csv"
    if not table.exists():
        return []
    with open(table, newline="") as fh:
        return list(csv.DictReader(fh))


REAL = _real_rows()
needs_real = pytest.mark.skipif(not REAL, reason="../shared/data/videos not present")


@needs_real
@pytest.mark.parametrize("row", REAL, ids=[r["file"].split("/")[-1] for r in REAL])
def test_real_clip_probes_and_samples(row):
    path = DATA / row["file"]
    assert sniff.kind_of(path) == "video"
    info = probe(path)
    assert info.duration == pytest.approx(float(row["duration_s"]), rel=0.01, abs=0.05)
    assert info.fps == pytest.approx(float(row["fps"]), rel=0.01)
    assert (info.width, info.height) == (int(row["width"]), int(row["height"]))
    assert info.rotation == 0
    sv = sample_video(path, frames=4)
    assert len(sv.frames) == 4
    assert all(im.size == (info.width, info.height) and im.mode == "RGB" for im in sv.frames)
    assert sv.times == sorted(sv.times) and 0 <= sv.times[0] and sv.times[-1] < info.duration
    if path.name == "tree.avi":
        assert info.frames == 444 and info.stored_frames == 68
        assert any("444" in w and "68" in w for w in sv.warnings)
    else:
        assert sv.warnings == []


@needs_real
def test_real_clip_fps1_matches_upstream_indices():
    # upstream: frame indices int(fps * i) for i < floor(n_frames / fps)
    for name, n, fps in [("bikes.mp4", 250, 25.0), ("carphone_pristine.mp4", 120, 30000 / 1001),
                         ("Megamind.avi", 270, 24000 / 1001)]:
        sv = sample_video(VIDEOS / name)
        assert sv.indices == [int(fps * i) for i in range(int(n / fps))], name


@needs_real
def test_tree_avi_decodes_partially_with_a_warning():
    sv = sample_video(VIDEOS / "tree.avi")
    assert len(sv.frames) == 16  # 29 one-per-second instants, capped
    assert sv.info.frames == 444 and sv.info.stored_frames == 68
    assert len(sv.warnings) == 1 and "only 68 are stored" in sv.warnings[0]
    # each sample is the stored frame on screen at its time (timestamps are frame numbers)
    with av.open(str(VIDEOS / "tree.avi")) as c:
        s = c.streams.video[0]
        tick = float(s.time_base)  # 66667 us: 14.99993 fps, not quite 15
        stored = [e.timestamp for e in s.index_entries]
    for t, i, time in zip(sv.planned, sv.indices, sv.times):
        expected = max(n for n in stored if n * tick <= t + 1e-9)
        assert i == expected and time == pytest.approx(expected * tick)
