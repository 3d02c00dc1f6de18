"""The synthetic-distortion training corpus: KADID-10k's 25 distortions applied to pristine photos,
each image labelled with the *human* mean score KADID-10k measured for that (type, level).

Layout of ``out_dir``::

    images/<source>/<source>.png           the resized pristine copy (when include_pristine)
    images/<source>/<source>_TT_L.png      type TT (01..25) at level L (1..5)
    labels.csv                             path,score,std,split,ref,dist_type,type_id,level
    corpus.json                            the settings that decide pixel content (seed, long_side)

Each distorted image depends only on (seed, source, type, level, long_side): its random generator
is seeded from exactly those, so a build is reproducible, can be resumed (existing PNGs are
skipped), and can be extended with more types or levels later without touching earlier files.
Train/test is split by whole source photo, so no photo contributes to both sides.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .. import wheels


# The distortion code pulls in scipy; imported on first use so that `qalign --help` stays instant.
def _distortions():
    from . import distortions

    return distortions


def _kadid():
    from . import kadid

    return kadid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# "ref" names the source photo (as KADID's ref_img_path): qalign's label reader treats a "source"
# column as the dataset name, and "ref" as the reference for content-disjoint splits.
LABEL_COLUMNS = ("path", "score", "std", "split", "ref", "dist_type", "type_id", "level")

# Pristine copies are not in KADID's ratings (its 81 references were never scored), so they get a
# label above every KADID cell: the best cells (identity levels such as GBLUR L1, mean shift L3)
# average 4.60-4.61 with std ~0.13, and an undistorted image must rank above them.
PRISTINE_SCORE = 4.8
PRISTINE_STD = 0.2
PRISTINE_TYPE = "pristine"

PNG_COMPRESS_LEVEL = 3  # as small as level 6 on photos, and about twice as fast to write

# Settings that change pixel content; a resumed build must use the same ones.
_CONTENT_KEYS = ("seed", "long_side")


@dataclass(frozen=True)
class SourceJob:
    """All the images to make from one source photo."""

    path: str
    source: str
    split: str
    out_dir: str
    seed: int
    long_side: int
    cells: tuple[tuple[int, int], ...]  # (type_id, level) pairs
    include_pristine: bool


# ----------------------------------------------------------------------------- sources and split


def list_sources(pristine_dir: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``pristine_dir`` (MANIFEST and other non-images are ignored),
    sorted by name. Two files may not share a stem: the stem names the source in the corpus."""
    folder = Path(pristine_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"pristine folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise ValueError(f"two sources share the name {p.stem!r}: {seen[p.stem].name} and {p.name}")
        seen[p.stem] = p
    return paths


def _stable_int(*parts) -> int:
    """A 64-bit integer from the parts, the same on every machine and Python run (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def split_sources(paths, test_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Split source photos into (train, test), whole photos only, deterministically.

    Sources are ranked by a seeded hash of their file stem, so the result does not depend on the
    order of ``paths``, and the first round(n * test_fraction) of that ranking go to test (at least
    one when the fraction is positive and there are two or more sources). Both lists are sorted.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    items = list(paths)
    names = [Path(p).stem for p in items]
    if len(set(names)) != len(names):
        raise ValueError("source names (file stems) must be unique")
    n_test = int(round(len(items) * test_fraction))
    if test_fraction > 0 and len(items) >= 2:
        n_test = min(max(n_test, 1), len(items) - 1)
    ranked = sorted(items, key=lambda p: (_stable_int("split", seed, Path(p).stem), Path(p).stem))
    test = sorted(ranked[:n_test], key=lambda p: Path(p).stem)
    train = sorted(ranked[n_test:], key=lambda p: Path(p).stem)
    return train, test


def _limit(train: list, test: list, limit: int | None, test_fraction: float, seed: int) -> tuple[list, list]:
    """Keep ``limit`` sources, in the same train/test proportion, without re-splitting.

    The kept ones are drawn by a seeded hash, not by name, so that a small corpus is not made of
    one collection's photos (names share prefixes such as ``gcompris-qt-data_animals_``).
    """
    if limit is None or limit >= len(train) + len(test):
        return train, test
    if limit < 1:
        raise ValueError(f"limit_sources must be >= 1, got {limit}")
    n_test = min(len(test), int(round(limit * test_fraction)))
    if test_fraction > 0 and limit >= 2 and test:
        n_test = max(n_test, 1)

    def pick(group, count):
        ranked = sorted(group, key=lambda p: (_stable_int("limit", seed, Path(p).stem), Path(p).stem))
        return sorted(ranked[:count], key=lambda p: Path(p).stem)

    return pick(train, limit - n_test), pick(test, n_test)


# ----------------------------------------------------------------------------- per-source work


def cells_for_source(source: str, types, levels_per_type: int, seed: int) -> tuple[tuple[int, int], ...]:
    """The (type, level) pairs to make for one source: all 5 levels, or ``levels_per_type`` of them
    drawn at random per (source, type) with a generator seeded from (seed, source, type)."""
    cells = []
    for type_id in types:
        if levels_per_type >= 5:
            levels = _distortions().LEVELS
        else:
            rng = np.random.default_rng([seed, _stable_int("levels", source), type_id])
            levels = sorted(int(v) + 1 for v in rng.choice(5, size=levels_per_type, replace=False))
        cells.extend((type_id, level) for level in levels)
    return tuple(cells)


def distortion_rng(seed: int, source: str, type_id: int, level: int) -> np.random.Generator:
    """The generator of one corpus image, seeded from (seed, source, type, level) only."""
    return np.random.default_rng([seed, _stable_int("distort", source), type_id, level])


def image_relpath(source: str, type_id: int | None = None, level: int | None = None) -> str:
    """Path of a corpus image relative to the corpus folder (pristine copy when type_id is None)."""
    name = source if type_id is None else f"{source}_{type_id:02d}_{level}"
    return f"images/{source}/{name}.png"


def load_resized(path: str | os.PathLike, long_side: int) -> np.ndarray:
    """The source as uint8 RGB with its long side shrunk to ``long_side`` (Lanczos, aspect kept).

    Smaller sources are left at their size: upscaling would blur a photo that is labelled pristine.
    Transparent pixels are composited onto white rather than exposing whatever colour they hold, and
    an EXIF orientation tag is applied so camera JPEGs come out upright.
    """
    with Image.open(path) as opened:
        im = ImageOps.exif_transpose(opened)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, rgba)
        im = im.convert("RGB")
        width, height = im.size
        scale = long_side / max(width, height)
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            im = im.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8).copy()


def _write_png(array: np.ndarray, target: Path) -> None:
    """Write atomically, so an interrupted build never leaves a truncated PNG that a resume skips."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    try:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _label_row(job: SourceJob, relpath: str, score: float, std: float, dist_type: str, type_id: int, level: int):
    return {
        "path": relpath,
        "score": f"{score:.4f}",
        "std": f"{std:.4f}",
        "split": job.split,
        "ref": job.source,
        "dist_type": dist_type,
        "type_id": type_id,
        "level": level,
    }


def process_source(job: SourceJob) -> tuple[list[dict], int, int, float]:
    """Make every missing image of one source. Returns (label rows, written, skipped, seconds)."""
    start = time.perf_counter()
    means = _kadid().level_means()
    out_dir = Path(job.out_dir)
    rows, written, skipped = [], 0, 0
    image = None  # loaded only if something is missing

    def source_image():
        nonlocal image
        if image is None:
            image = load_resized(job.path, job.long_side)
        return image

    if job.include_pristine:
        relpath = image_relpath(job.source)
        if (out_dir / relpath).exists():
            skipped += 1
        else:
            _write_png(source_image(), out_dir / relpath)
            written += 1
        rows.append(_label_row(job, relpath, PRISTINE_SCORE, PRISTINE_STD, PRISTINE_TYPE, 0, 0))
    for type_id, level in job.cells:
        relpath = image_relpath(job.source, type_id, level)
        if (out_dir / relpath).exists():
            skipped += 1
        else:
            rng = distortion_rng(job.seed, job.source, type_id, level)
            _write_png(_distortions().apply(source_image(), type_id, level, rng), out_dir / relpath)
            written += 1
        mean, std = means[(type_id, level)]
        rows.append(_label_row(job, relpath, mean, std, _distortions().name_of(type_id), type_id, level))
    return rows, written, skipped, time.perf_counter() - start


# ----------------------------------------------------------------------------- the whole corpus


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to resume into a corpus whose images were made with other content settings."""
    record = out_dir / "corpus.json"
    if record.exists():
        previous = json.loads(record.read_text())
        changed = [k for k in _CONTENT_KEYS if previous.get(k) != settings[k]]
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise ValueError(f"{out_dir} was built with other settings ({detail}); use a new --out folder")


def _write_labels(rows: list[dict], target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["path"]))
    os.replace(tmp, target)


def _resolve_types(types) -> tuple[int, ...]:
    if types is None:
        return _distortions().TYPE_IDS
    resolved = tuple(sorted({int(t) for t in types}))
    bad = [t for t in resolved if t not in _distortions().TYPE_IDS]
    if bad or not resolved:
        raise ValueError(f"types must be ids in 1..25, got {list(types)}")
    return resolved


def build_corpus(
    pristine_dir,
    out_dir,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    long_side: int = 512,
    levels_per_type: int = 5,
    types=None,
    include_pristine: bool = True,
    workers: int = 2,
    limit_sources: int | None = None,
    progress: bool = True,
) -> Path:
    """Build (or resume) the synthetic corpus in ``out_dir``; returns the path of labels.csv.

    ``types``: type ids to use (default all 25). ``levels_per_type`` < 5 draws that many levels per
    (source, type). ``limit_sources`` keeps that many sources (train/test proportion kept) for a
    quick corpus. ``workers`` > 1 uses a process pool; 1 works in this process.
    """
    if long_side < 16:
        raise ValueError(f"long_side must be at least 16 px, got {long_side}")
    if not 1 <= levels_per_type <= 5:
        raise ValueError(f"levels_per_type must be in 1..5, got {levels_per_type}")
    type_ids = _resolve_types(types)
    out_dir = Path(out_dir)
    train, test = split_sources(list_sources(pristine_dir), test_fraction, seed)
    train, test = _limit(train, test, limit_sources, test_fraction, seed)
    settings = {
        "seed": seed,
        "long_side": long_side,
        "test_fraction": test_fraction,
        "levels_per_type": levels_per_type,
        "types": list(type_ids),
        "include_pristine": include_pristine,
        "sources": {"train": len(train), "test": len(test)},
        "pristine_label": {"score": PRISTINE_SCORE, "std": PRISTINE_STD},
        "labels": "KADID-10k per-(type, level) mean and std of per-image MOS (qalign.data.kadid)",
    }
    _check_settings(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    _kadid().level_means()  # fail early (and warm the cache before forking) if the labels are missing

    jobs = [
        SourceJob(str(p), Path(p).stem, split, str(out_dir), seed, long_side,
                  cells_for_source(Path(p).stem, type_ids, levels_per_type, seed), include_pristine)
        for split, group in (("train", train), ("test", test))
        for p in group
    ]
    start = time.perf_counter()
    rows, written, skipped = [], 0, 0
    for done, (job_rows, job_written, job_skipped, seconds) in enumerate(_run_jobs(jobs, workers), 1):
        rows.extend(job_rows)
        written += job_written
        skipped += job_skipped
        if progress:
            source = job_rows[0]["ref"] if job_rows else "?"
            print(f"[{done}/{len(jobs)}] {source}: {job_written} written, {job_skipped} skipped "
                  f"({seconds:.1f} s)", file=sys.stderr, flush=True)
    labels = out_dir / "labels.csv"
    _write_labels(rows, labels)
    (out_dir / "corpus.json").write_text(json.dumps(settings, indent=2) + "\n")
    elapsed = time.perf_counter() - start
    if progress:
        n_train = sum(r["split"] == "train" for r in rows)
        print(f"corpus {out_dir}: {len(rows)} images ({n_train} train, {len(rows) - n_train} test) from "
              f"{len(train)} + {len(test)} sources; {written} written, {skipped} already there; "
              f"{elapsed:.1f} s; labels in {labels}", file=sys.stderr, flush=True)
    return labels


def _run_jobs(jobs: list[SourceJob], workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(process_source, jobs)
        return
    with multiprocessing.Pool(processes=min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(process_source, jobs)


# ----------------------------------------------------------------------------- CLI hooks


def parse_types(text: str) -> list[int]:
    """``"1,2,10-12"`` or KADID names (``"JPEG,AWGN"``) -> type ids."""
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in _distortions().DISTORTION_NAMES:
            ids.append(_distortions().DISTORTION_NAMES.index(part) + 1)
        elif "-" in part and all(s.strip().isdigit() for s in part.split("-", 1)):
            lo, hi = (int(s) for s in part.split("-", 1))
            ids.extend(range(lo, hi + 1))
        elif part.isdigit():
            ids.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"unknown distortion type {part!r} (use 1..25 or a KADID name)")
    bad = [i for i in ids if i not in _distortions().TYPE_IDS]
    if bad or not ids:
        raise argparse.ArgumentTypeError(f"distortion types must be in 1..25, got {text!r}")
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``qalign data synth``."""
    parser.add_argument("--pristine", required=True, help="folder of pristine source photos")
    parser.add_argument("--out", required=True, help="corpus folder (created; re-running resumes)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of source photos held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of every distortion (default 0)")
    parser.add_argument("--long-side", type=int, default=512, help="resize sources to this long side, px (default 512, as KADID)")
    parser.add_argument("--levels-per-type", type=int, default=5, choices=range(1, 6), metavar="{1..5}",
                        help="levels per (source, type); fewer than 5 are drawn at random (default 5)")
    parser.add_argument("--types", type=parse_types, default=None,
                        help="distortion types, e.g. '1-3,10' or 'JPEG,AWGN' (default all 25)")
    parser.add_argument("--no-pristine", action="store_true", help="leave out the undistorted copies")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--limit-sources", type=int, default=None, help="use only this many sources (quick runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qalign data synth``; returns the exit status."""
    try:
        labels = build_corpus(
            args.pristine,
            args.out,
            test_fraction=args.test_fraction,
            seed=args.seed,
            long_side=args.long_side,
            levels_per_type=args.levels_per_type,
            types=args.types,
            include_pristine=not args.no_pristine,
            workers=args.workers,
            limit_sources=args.limit_sources,
            progress=not args.quiet,
        )
    except (FileNotFoundError, ValueError, wheels.WheelError) as exc:
        print(f"qalign data synth: error: {exc}", file=sys.stderr)
        return 2
    print(labels)
    return 0
