"""Video scoring at scale: a long 720p clip in bounded memory, and clean vs low-bitrate real clips.

    python benchmarks/bench_video.py [--minutes 10] [--fps 25] [--model qalign-tiny] [--cache runs/bench_video]

1. Writes (once; cached) a synthetic 1280x720 H.264 clip of ``--minutes`` minutes at ``--fps``:
   low-complexity moving content so that encoding is quick. Then runs ``qalign score CLIP`` as a
   subprocess for a few sampling settings and measures each process's wall time and peak RSS
   (ru_maxrss of that child, from ``os.wait4`` -- the per-child form of
   ``getrusage(RUSAGE_CHILDREN)``). A one-image run gives the model's own footprint for reference.
2. Re-encodes real clips from ../shared/data/videos with libx264 at ~50 kbit/s (PyAV) and prints
   the scores of the original and the re-encode (and carphone_distorted.mp4, the dataset's own
   heavily compressed copy). With the trained qalign-tiny the low-bitrate copies should score lower.

Model: ``qalign-tiny`` when its trained weights are in the package; otherwise (or with
``--model untrained``) a qalign-tiny folder with the real bases and an UNTRAINED abstractor,
built under the cache folder -- the same architecture, size and speed, so time and memory are
representative, but its scores mean nothing (the table says so).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from videos import reencode  # noqa: E402  (the test helpers that make and re-encode videos)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "videos"
WEIGHTS = ROOT / "src" / "qalign" / "weights" / "qalign-tiny" / "trained.safetensors"
GOAL_RSS_GB = 3.0


# --------------------------------------------------------------------------- inputs


def make_long_clip(path: Path, minutes: float, fps: int, size=(1280, 720)) -> Path:
    """Low-complexity 720p H.264: a drifting gradient, a moving box and a bar that changes every
    second. Written straight in yuv420p (no RGB conversion per frame); libx264 ultrafast."""
    import av
    import numpy as np

    if path.exists() and path.stat().st_size > 0:
        return path
    width, height = size
    n = int(round(minutes * 60 * fps))
    tmp = path.with_suffix(".part.mp4")
    xs = np.arange(width * 2, dtype=np.float32)
    band = (64 + 96 * (0.5 + 0.5 * np.sin(xs / 97.0))).astype(np.uint8)  # wraps smoothly
    ys = (np.arange(height, dtype=np.int32)[:, None] // 8) % 2
    start = time.perf_counter()
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "23", "g": str(10 * fps)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        buf = np.empty((height * 3 // 2, width), np.uint8)
        for k in range(n):
            shift = (4 * k) % width
            y = buf[:height]
            y[:] = band[shift : shift + width][None, :] + (ys * 12).astype(np.uint8)
            bx = (8 * k) % (width - 160)
            by = (height // 2 - 80) + int(60 * np.sin(k / fps))
            y[by : by + 160, bx : bx + 160] = 220
            second = k // fps
            y[: height // 12, : width * ((second % 10) + 1) // 10] = 30 + 20 * (second % 8)
            buf[height : height + height // 4] = 128 + (second % 5) * 6  # U plane
            buf[height + height // 4 :] = 128 - (second % 7) * 5  # V plane
            frame = av.VideoFrame.from_ndarray(buf, format="yuv420p")
            frame.pts = k
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    print(f"wrote {path} ({n} frames, {path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    return path


def untrained_folder(cache: Path) -> Path:
    """qalign-tiny with the real bases and a fresh (untrained) abstractor: realistic cost, no skill."""
    folder = cache / "qalign-tiny-untrained"
    if (folder / "trained.safetensors").exists():
        return folder
    from qalign.models.tiny.backend import assemble, base_config, save_tiny

    config = base_config()
    model = assemble(config)
    trained = {f"visual_abstractor.{k}": v for k, v in model.visual_abstractor.state_dict().items()}
    return save_tiny(folder, config, trained, metadata={"note": "untrained abstractor (bench_video fallback)"})


def pick_model(arg: str | None, cache: Path) -> tuple[str, str]:
    """(model argument for `qalign score`, how to describe it)."""
    if arg and arg != "untrained":
        return arg, arg
    if arg is None and WEIGHTS.exists():
        return "qalign-tiny", "qalign-tiny (trained weights)"
    why = "asked for" if arg == "untrained" else "trained qalign-tiny weights absent"
    return str(untrained_folder(cache)), f"qalign-tiny bases + UNTRAINED abstractor ({why}; scores meaningless)"


# --------------------------------------------------------------------------- measuring


def measured_score(paths: list[str], model: str, flags: list[str], workdir: Path) -> dict:
    """One `qalign score` process: wall time, peak RSS (this child's ru_maxrss), its rows."""
    out_csv = workdir / "rows.csv"
    pf_csv = workdir / "per_frame.csv"
    for p in (out_csv, pf_csv):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "qalign", "score", *paths, "--model", model, "--device", "cpu",
           "--output", str(out_csv), "--per-frame", str(pf_csv), *flags]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"qalign score failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    frames = 0
    if pf_csv.exists():
        with open(pf_csv, newline="") as fh:
            frames = sum(1 for _ in csv.DictReader(fh))
    rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"wall": wall, "rss_gb": rss_bytes / 1e9, "rows": rows, "frames": frames, "stderr": stderr}


def probe(path: Path) -> tuple[float, str, float]:
    from qalign.media.video import probe as vprobe

    info = vprobe(path)
    return info.duration, f"{info.width}x{info.height}", info.fps


def table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=25, help="frame rate of the synthetic 720p clip")
    parser.add_argument("--model", default=None,
                        help="model for `qalign score` (default: qalign-tiny if trained, else 'untrained')")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench_video"))
    parser.add_argument("--no-uncapped", action="store_true", help="skip the --max-frames 0 (no cap) run")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--skip-bitrate", action="store_true")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, model_desc = pick_model(args.model, cache)
    work = Path(tempfile.mkdtemp(prefix="bench-video-"))

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"model: {model_desc}")

    if not args.skip_long:
        name = f"long_{args.minutes:g}min_720p_{args.fps}fps.mp4"
        clip = make_long_clip(cache / name, args.minutes, args.fps)
        duration, resolution, fps = probe(clip)
        image = work / "one.png"
        from PIL import Image

        Image.new("RGB", (1280, 720), (90, 120, 150)).save(image)
        settings = [("one 720p image (model alone)", [str(image)], []),
                    ("--fps 1 (default, cap 16)", [str(clip)], []),
                    ("--frames 8", [str(clip)], ["--frames", "8"])]
        if not args.no_uncapped:
            settings.append(("--fps 1 --max-frames 0 (no cap)", [str(clip)], ["--max-frames", "0"]))
        body = []
        for label, paths, flags in settings:
            r = measured_score(paths, model, flags, work)
            is_image = paths[0] == str(image)
            body.append([label, "-" if is_image else f"{duration:.1f} s", "1280x720" if is_image else resolution,
                         "-" if is_image else f"{fps:g}", str(r["frames"] or 1), f"{r['wall']:.1f} s",
                         f"{r['rss_gb']:.2f} GB", "yes" if r["rss_gb"] < GOAL_RSS_GB else "NO",
                         f"{float(r['rows'][0]['score_1_5']):.3f}"])
        print()
        print(f"Long video: {clip.name}, {clip.stat().st_size / 1e6:.1f} MB (H.264, synthetic low-complexity content)")
        print(table(["setting", "duration", "resolution", "fps", "frames sampled", "wall", "peak RSS",
                     f"< {GOAL_RSS_GB:g} GB", "score"], body))

    if not args.skip_bitrate:
        if not SHARED.is_dir():
            print(f"\n{SHARED} not present: skipping the bitrate comparison")
            return
        inputs, labels = [], []
        for clip_name in ("bikes.mp4", "carphone_pristine.mp4"):
            src = SHARED / clip_name
            low = reencode(src, cache / f"{src.stem}_50k.mp4", 50_000)
            inputs += [str(src), str(low)]
            labels += [(clip_name, "original"), (clip_name, "libx264 50 kbit/s")]
        inputs.append(str(SHARED / "carphone_distorted.mp4"))
        labels.append(("carphone_pristine.mp4", "carphone_distorted.mp4 (dataset's own)"))
        r = measured_score(inputs, model, [], work)
        body = []
        for (clip_name, version), path, row in zip(labels, inputs, r["rows"]):
            duration, resolution, _ = probe(Path(path))
            kbps = Path(path).stat().st_size * 8 / duration / 1000
            body.append([clip_name, version, resolution, f"{kbps:.0f} kbit/s", f"{float(row['score_1_5']):.3f}"])
        print()
        print(f"Clean vs low bitrate (one `qalign score` run, default sampling: {r['wall']:.1f} s, "
              f"peak RSS {r['rss_gb']:.2f} GB)")
        print(table(["clip", "version", "resolution", "bitrate", "score [1-5]"], body))


if __name__ == "__main__":
    main()
