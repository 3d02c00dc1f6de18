"""Videos through the Scorer and ``qalign score``: sampling, aggregation, content sniffing, bad
files, per-frame output. Tiny random model; clips written with PyAV (tests/videos.py) into tmp.

Every frame of a synthetic clip has its own colour per second, so the loud random model gives
each second a visibly different score: a scorer that took the wrong frames, or averaged scores
instead of logits, gets different numbers than the independent computation here.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from qalign.cli import main  # noqa: E402
from qalign.levels import LEVELS  # noqa: E402
from qalign.media.video import sample_video  # noqa: E402
from qalign.models.base import Backend, ModelInfo  # noqa: E402
from qalign.scoring import PROB_FIELDS, Scorer, VideoOptions  # noqa: E402

from tiny_model import make_image  # noqa: E402
from videos import reencode, write_audio_only, write_video  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "qalign" / "weights" / "qalign-tiny"

CLIP10_FPS1 = [25 * k for k in range(10)]  # frame on screen at t = 0, 1, ..., 9 s (25 fps)
CLIP10_FRAMES8 = [15, 46, 78, 109, 140, 171, 203, 234]  # ... at the centres of 8 segments
CLIP10_CAP4 = [25, 75, 150, 200]  # 1 fps plan (10 instants) capped at 4: centres of 4 runs


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("video-scoring")


@pytest.fixture(scope="module")
def clip10(vdir) -> Path:
    """10 s, 25 fps, 64x48 H.264 MP4, a keyframe every 2 s, a new colour every second."""
    path = vdir / "clip10.mp4"
    write_video(path, duration=10, fps=25, gop=50)
    return path


@pytest.fixture(scope="module")
def clip3(vdir) -> Path:
    path = vdir / "clip3.mkv"
    write_video(path, duration=3, fps=10)
    return path


@pytest.fixture(scope="module")
def half(vdir) -> Path:
    path = vdir / "half.mp4"
    write_video(path, duration=0.5, fps=25)
    return path


@pytest.fixture(scope="module")
def backend(tiny_scorer):
    return tiny_scorer.backend


def scorer_with(backend, **video) -> Scorer:
    return Scorer(backend, batch_size=4, video=VideoOptions(**video))


def softmax_expectation(logits: np.ndarray) -> tuple[np.ndarray, float]:
    """Q-Align's close-set answer, computed here without qalign.levels."""
    z = np.exp(logits - logits.max())
    p = z / z.sum()
    return p, float(p @ np.arange(1, 6))


def frame_logits(backend, images) -> np.ndarray:
    """Each frame judged alone as an image, straight from the backend: [F, 5]."""
    return np.stack([
        np.asarray(backend.level_logits([backend.preprocess(im)[None]], input_kind="image"), dtype=np.float64)[0]
        for im in images
    ])


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("video, indices", [
    (dict(), CLIP10_FPS1),  # default: 1 fps, as Q-Align
    (dict(fps=1), CLIP10_FPS1),  # 10 frames, under the cap of 16
    (dict(frames=8), CLIP10_FRAMES8),
    (dict(max_frames=4), CLIP10_CAP4),
    (dict(fps=4), [int((i + 0.5) * 40 / 16) * 25 // 4 for i in range(16)]),  # 40 planned, capped at 16
    (dict(fps=4, max_frames=None), [k * 25 // 4 for k in range(40)]),
], ids=["default", "fps1", "frames8", "cap4", "fps4-cap16", "fps4-nocap"])
def test_sampling_through_the_scorer(backend, clip10, video, indices):
    row = scorer_with(backend, **video).score(str(clip10))[0]
    assert row.ok and row.kind == "video" and row.warnings == []
    assert row.frames == len(indices) == len(row.per_frame)
    assert [f.index for f in row.per_frame] == indices
    assert [f.time for f in row.per_frame] == pytest.approx([i / 25 for i in indices], abs=1e-6)


def test_half_second_clip_gives_one_frame(backend, half):
    for video in (dict(), dict(fps=1), dict(max_frames=4)):
        row = scorer_with(backend, **video).score(str(half))[0]
        assert row.ok and row.frames == 1
        assert [(f.index, f.time) for f in row.per_frame] == [(0, 0.0)]


@pytest.mark.parametrize("video", [dict(fps=1, frames=8), dict(fps=0), dict(frames=0), dict(max_frames=0),
                                   dict(max_frames=-1), dict(fps=float("nan"))])
def test_bad_video_options_are_refused_up_front(video):
    with pytest.raises(ValueError, match="video sampling"):
        VideoOptions(**video)


# --------------------------------------------------------------------------- aggregation


def test_per_frame_mode_averages_logits_not_scores(backend, clip10):
    row = scorer_with(backend, frames=8).score(str(clip10))[0]
    sv = sample_video(clip10, frames=8)  # the same frames, decoded independently
    assert sv.indices == [f.index for f in row.per_frame]
    logits = frame_logits(backend, sv.frames)
    probs, score = softmax_expectation(logits.mean(0))
    assert row.score == pytest.approx(score, abs=1e-5)
    np.testing.assert_allclose(row.probs, probs, atol=1e-6)
    for f, lg in zip(row.per_frame, logits):
        p, s = softmax_expectation(lg)
        assert f.score == pytest.approx(s, abs=1e-5)
        np.testing.assert_allclose(f.probs, p, atol=1e-6)
    # the frames really differ, and the mean of their scores is a different number
    frame_scores = [f.score for f in row.per_frame]
    assert max(frame_scores) - min(frame_scores) > 0.05
    assert abs(np.mean(frame_scores) - row.score) > 1e-3
    assert row.score_0_1 == pytest.approx((row.score - 1) / 4)
    assert row.level == LEVELS[int(np.argmax(probs))]


class Recorder(Backend):
    """Wraps the tiny backend, declares a video mode and records every call."""

    def __init__(self, inner, video: str):
        self.inner = inner
        self.info = ModelInfo(name=f"recorder-{video}", video=video)
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def preprocess(self, image):
        return self.inner.preprocess(image)

    def level_logits(self, items, task="quality", input_kind="image"):
        self.calls.append((input_kind, [tuple(x.shape) for x in items]))
        return self.inner.level_logits(items, task=task, input_kind=input_kind)


def test_native_backend_gets_whole_videos_with_the_video_prompt(backend, clip10, clip3, tmp_path):
    image = tmp_path / "still.png"
    make_image(2).save(image)
    rec = Recorder(backend, "native")
    rows = Scorer(rec, batch_size=4, workers=1).score([str(clip10), str(image), str(clip3)])
    assert [r.kind for r in rows] == ["video", "image", "video"] and all(r.ok for r in rows)
    size = backend.image_size
    # images and videos never share a call; both videos come in ONE call, one item each
    assert sorted(rec.calls) == sorted([
        ("image", [(1, 3, size, size)]),
        ("video", [(10, 3, size, size), (3, 3, size, size)]),
    ])
    assert rows[0].frames == 10 and rows[2].frames == 3
    assert rows[0].per_frame == [] and rows[2].per_frame == []  # a native model judges the whole
    # the tiny backend averages the frames' logits itself, so the native score is that average's
    logits = frame_logits(backend, sample_video(clip10).frames)
    assert rows[0].score == pytest.approx(softmax_expectation(logits.mean(0))[1], abs=1e-5)


def test_per_frame_backend_gets_single_frames_with_the_image_prompt(backend, clip3):
    rec = Recorder(backend, "per-frame")
    row = Scorer(rec, batch_size=2, workers=1).score(str(clip3))[0]
    assert row.ok and row.frames == 3
    size = backend.image_size
    assert rec.calls == [("image", [(1, 3, size, size)] * 2), ("image", [(1, 3, size, size)])]


# --------------------------------------------------------------------------- Python API


def test_list_of_pil_frames_is_a_video(tiny_scorer, backend):
    frames = [make_image(i, size=(64, 48)) for i in (0, 1, 2)]
    rows = tiny_scorer.score([frames, frames[1], tuple(frames[:2]), []])
    video, image, pair, empty = rows
    assert video.ok and video.kind == "video" and video.frames == 3
    assert video.path == "<video 0>" and pair.path == "<video 2>"
    assert [f.index for f in video.per_frame] == [0, 1, 2]
    logits = frame_logits(backend, frames)
    assert video.score == pytest.approx(softmax_expectation(logits.mean(0))[1], abs=1e-5)
    assert image.kind == "image" and image.frames == 1
    assert image.score == pytest.approx(video.per_frame[1].score, abs=1e-5)
    assert pair.score == pytest.approx(softmax_expectation(logits[:2].mean(0))[1], abs=1e-5)
    assert not empty.ok and "at least one frame" in empty.error and empty.kind == "video"


def test_frames_of_different_sizes_for_a_raw_pixel_backend(backend):
    """A backend whose preprocess keeps the frame size (chat VLMs) cannot take mixed-size frames."""

    class Raw(Recorder):
        def preprocess(self, image):
            import torch

            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)

    raw = Raw(backend, "native")
    mixed = [make_image(0, size=(64, 48)), make_image(1, size=(32, 24))]
    rows = Scorer(raw, workers=1).score([mixed, make_image(2, size=(40, 30))])
    assert not rows[0].ok and "all frames of a video at one size" in rows[0].error and rows[0].kind == "video"
    assert rows[1].ok and raw.calls == [("image", [(1, 3, 30, 40)])]


# --------------------------------------------------------------------------- content decides


def test_image_or_video_by_content_not_extension(tiny_scorer, clip10, tmp_path):
    video_named_png = tmp_path / "video.png"
    shutil.copy(clip10, video_named_png)
    image_named_mp4 = tmp_path / "image.mp4"
    make_image(5).save(image_named_mp4, format="PNG")
    real_png = tmp_path / "real.png"
    make_image(5).save(real_png)
    rows = tiny_scorer.score([str(video_named_png), str(image_named_mp4), str(clip10), str(real_png)])
    assert all(r.ok for r in rows), [r.error for r in rows]
    assert [r.kind for r in rows] == ["video", "image", "video", "image"]
    assert [r.frames for r in rows] == [10, 1, 10, 1]
    assert rows[0].score == pytest.approx(rows[2].score, abs=1e-6)
    assert rows[1].score == pytest.approx(rows[3].score, abs=1e-6)


# --------------------------------------------------------------------------- bad videos


@pytest.fixture(scope="module")
def bad_videos(vdir, clip10) -> dict[str, Path]:
    out = {}
    out["empty"] = vdir / "empty.mp4"
    out["empty"].write_bytes(b"")
    out["audio"] = vdir / "tone.mp4"  # an MP4 with one AAC track and no video
    write_audio_only(out["audio"], seconds=1.0)
    out["text"] = vdir / "notes.mp4"
    out["text"].write_text("this is not a video\n" * 20)
    out["cut_noindex"] = vdir / "cut_noindex.mp4"  # moov at the end, cut off: nothing usable
    data = clip10.read_bytes()
    out["cut_noindex"].write_bytes(data[: len(data) * 6 // 10])
    whole = vdir / "faststart.mp4"  # moov first: the first seconds still decode
    write_video(whole, duration=10, fps=25, gop=25, container_options={"movflags": "+faststart"})
    out["cut"] = vdir / "cut.mp4"
    data = whole.read_bytes()
    out["cut"].write_bytes(data[: len(data) * 7 // 10])
    return out


BAD_REASONS = {
    "empty": "empty file",
    "audio": "no video stream",
    "text": "text file",
    "cut_noindex": "truncated or corrupt",
}


def test_bad_videos_fail_alone_and_the_batch_goes_on(tiny_scorer, clip10, bad_videos, tmp_path):
    image = tmp_path / "fine.png"
    make_image(1).save(image)
    names = ["empty", "audio", "text", "cut_noindex", "cut"]
    inputs = [str(clip10), str(bad_videos["empty"]), str(image), str(bad_videos["audio"]), str(bad_videos["text"]),
              str(bad_videos["cut_noindex"]), str(bad_videos["cut"]), str(clip10)]
    rows = tiny_scorer.score(inputs)
    assert [r.path for r in rows] == inputs
    by_name = dict(zip(names, [rows[1], rows[3], rows[4], rows[5], rows[6]]))
    for name, reason in BAD_REASONS.items():
        row = by_name[name]
        assert not row.ok and row.score is None and row.probs is None, name
        assert str(bad_videos[name]) in row.error and reason in row.error, (name, row.error)
    assert by_name["audio"].kind == "video" and by_name["cut_noindex"].kind == "video"
    # the truncated file with its index up front: the first K seconds, and a warning saying so
    cut = by_name["cut"]
    k = cut.frames
    assert cut.ok and 1 <= k < 10
    assert [f.index for f in cut.per_frame] == [25 * i for i in range(k)]
    assert len(cut.warnings) == 1 and f"used {k} of 10 planned frames" in cut.warnings[0]
    # the good inputs around them are untouched
    solo = tiny_scorer.score([str(clip10), str(image)])
    assert rows[0].ok and rows[7].ok and rows[2].ok
    assert rows[0].score == pytest.approx(solo[0].score, abs=1e-6) == rows[7].score
    assert rows[2].score == pytest.approx(solo[1].score, abs=1e-6)
    assert rows[0].warnings == [] and rows[0].frames == 10


# --------------------------------------------------------------------------- CLI


def _cli(capsys, model_dir, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["score", *map(str, args), "--model", str(model_dir), "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_cli_per_frame_file(capsys, tiny_model_dir, tiny_scorer, clip10, tmp_path, ext):
    pf = tmp_path / f"pf.{ext}"
    out = tmp_path / f"rows.{ext}"
    rc, stdout, err = _cli(capsys, tiny_model_dir, clip10, "--per-frame", pf, "--output", out)
    assert rc == 0, err
    api = tiny_scorer.score(str(clip10))[0]
    frames = _read_rows(pf)
    assert len(frames) == 10
    for f, ref in zip(frames, api.per_frame):
        assert set(f) == {"path", "frame_index", "time_s", "score_1_5", *PROB_FIELDS}
        assert f["path"] == str(clip10)
        assert int(f["frame_index"]) == ref.index and float(f["time_s"]) == pytest.approx(ref.time, abs=1e-4)
        assert float(f["score_1_5"]) == pytest.approx(ref.score, abs=1e-6)
        probs = [float(f[k]) for k in PROB_FIELDS]
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(probs, ref.probs, atol=1e-6)
    assert [int(f["frame_index"]) for f in frames] == CLIP10_FPS1
    assert [float(f["time_s"]) for f in frames] == pytest.approx(list(range(10)), abs=1e-4)
    (row,) = _read_rows(out)
    assert float(row["score_1_5"]) == pytest.approx(api.score, abs=1e-6) and not row["error"]


@pytest.mark.parametrize("flags, indices", [
    (["--frames", "8"], CLIP10_FRAMES8),
    (["--max-frames", "4"], CLIP10_CAP4),
    (["--fps", "1"], CLIP10_FPS1),
    (["--fps", "4", "--max-frames", "0"], [k * 25 // 4 for k in range(40)]),  # 0 = no cap
])
def test_cli_sampling_flags(capsys, tiny_model_dir, clip10, tmp_path, flags, indices):
    pf = tmp_path / "pf.csv"
    rc, _, err = _cli(capsys, tiny_model_dir, clip10, *flags, "--per-frame", pf, "--format", "none")
    assert rc == 0, err
    assert [int(f["frame_index"]) for f in _read_rows(pf)] == indices


def test_cli_refuses_conflicting_video_flags(capsys, tiny_model_dir, clip10, tmp_path):
    rc, _, err = _cli(capsys, tiny_model_dir, clip10, "--fps", "1", "--frames", "8")
    assert rc == 2 and "either fps or frames" in err
    rc, _, err = _cli(capsys, tiny_model_dir, clip10, "--max-frames", "-2")
    assert rc == 2 and "max_frames" in err
    with pytest.raises(SystemExit, match=r"\.csv or \.jsonl"):
        _cli(capsys, tiny_model_dir, clip10, "--per-frame", tmp_path / "pf.txt")


def test_cli_bad_videos_exit_1_and_the_rest_is_scored(capsys, tiny_model_dir, clip10, bad_videos, tmp_path):
    out = tmp_path / "rows.csv"
    pf = tmp_path / "pf.jsonl"
    inputs = [clip10, *bad_videos.values()]
    rc, _, err = _cli(capsys, tiny_model_dir, *inputs, "--output", out, "--per-frame", pf)
    assert rc == 1
    rows = {r["path"]: r for r in _read_rows(out)}
    assert set(rows) == {str(p) for p in inputs}
    assert rows[str(clip10)]["score_1_5"] and not rows[str(clip10)]["error"]
    assert rows[str(bad_videos["cut"])]["score_1_5"] and not rows[str(bad_videos["cut"])]["error"]
    for name, reason in BAD_REASONS.items():
        row = rows[str(bad_videos[name])]
        assert not row["score_1_5"] and reason in row["error"], name
        assert f"error: {bad_videos[name]}" in err
    assert f"{len(BAD_REASONS)} of {len(inputs)} inputs failed" in err
    assert "warning:" in err and "used " in err and "of 10 planned frames" in err
    frames = _read_rows(pf)  # per-frame rows only for what was scored
    k = sum(1 for f in frames if f["path"] == str(bad_videos["cut"]))
    assert {f["path"] for f in frames} == {str(clip10), str(bad_videos["cut"])}
    assert len(frames) == 10 + k and 1 <= k < 10


def test_cli_native_model_says_per_frame_file_stays_empty(capsys, tiny_scorer, clip3, tmp_path, monkeypatch):
    from qalign.models import registry

    rec = Recorder(tiny_scorer.backend, "native")
    monkeypatch.setattr(registry, "load_backend", lambda *a, **k: rec)
    pf = tmp_path / "pf.csv"
    rc, _, err = _cli(capsys, "whatever", clip3, "--per-frame", pf, "--format", "none")
    assert rc == 0, err
    assert "gets no per-frame rows" in err
    assert _read_rows(pf) == []
    assert [kind for kind, _ in rec.calls] == ["video"]


# --------------------------------------------------------------------------- real weights




@pytest.mark.real_weights
@pytest.mark.skipif(not (SHARED / "videos" / "bikes.mp4").exists(), reason="../shared/data/videos not present")
@pytest.mark.skipif(not (WEIGHTS / "trained.safetensors").exists(), reason="qalign-tiny weights not built")
@pytest.mark.parametrize("clip", ["bikes.mp4", "carphone_pristine.mp4"])
def test_real_weights_low_bitrate_reencode_scores_lower(clip, tmp_path):
    import qalign

    src = SHARED / "videos" / clip
    low = reencode(src, tmp_path / f"low_{clip}", 50_000)
    scorer = qalign.load("qalign-tiny", device="cpu")
    original, degraded = scorer.score([str(src), str(low)])
    assert original.ok and degraded.ok and original.kind == degraded.kind == "video"
    assert degraded.score < original.score - 0.5, (original.score, degraded.score)
