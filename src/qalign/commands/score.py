"""`qalign score`: media in, one row per input out (table, csv, jsonl, json)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("score", help="score images (files, folders, globs)",
                       description="Score media with a Q-Align model. Scores are on [1, 5] (bad = 1, excellent = 5); "
                                   "score_0_1 = (score_1_5 - 1) / 4 is the [0, 1] form of the same number.")
    p.add_argument("paths", nargs="+", help="files, folders or glob patterns")
    p.add_argument("--model", default="qalign-tiny", help="model name (see `qalign models`), folder or hub id")
    p.add_argument("--task", default="quality", choices=["quality", "aesthetics"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", help="write rows to FILE.csv or FILE.jsonl as they finish")
    p.add_argument("--format", choices=["table", "json", "csv", "jsonl", "none"], default=None,
                   help="what to print on stdout (default: table, or none when --output is given)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), float16, bfloat16")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--resume", action="store_true", help="with --output: score only inputs not already in the file")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images larger than this many pixels")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="score in N processes (one GPU each, or a share of the CPU cores); rows are merged back in "
                        "input order. Under `accelerate launch -m qalign score` / torchrun the launcher's processes are used")
    v = p.add_argument_group("video", "videos are found by content; frames are sampled by timestamp")
    v.add_argument("--fps", type=float, default=None, help="frames per second to sample (default 1, as Q-Align)")
    v.add_argument("--frames", type=int, default=None, help="sample N uniformly spaced frames instead (Q-ReAlign: 8)")
    v.add_argument("--max-frames", type=int, default=16,
                   help="cap on frames per video in --fps mode, subsampled uniformly (default 16; 0 = no cap)")
    v.add_argument("--per-frame", metavar="FILE", help="also write per-frame scores and times to FILE.csv/.jsonl")
    p.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    from ..shard import dispatch, wrap

    routed = dispatch(args)  # --num-processes / a launcher: workers and the launcher stop here
    if routed is not None:
        return routed
    from ..scoring import PROB_FIELDS, ROW_FIELDS, expand_inputs

    inputs = expand_inputs(args.paths, recursive=args.recursive)
    if not inputs:
        print("qalign: no input files found", file=sys.stderr)
        return 2
    fmt = args.format or ("none" if args.output else "table")
    if args.per_frame:
        _file_kind(Path(args.per_frame))  # a bad name fails now, not after the model has loaded
    done: set[str] = set()
    if args.output:
        out_path = Path(args.output)
        kind = _file_kind(out_path)
        if args.resume and out_path.exists():
            done = _finished_paths(out_path, kind)
        elif out_path.exists() and out_path.stat().st_size > 0 and not args.resume:
            out_path.unlink()
    elif args.resume:
        print("qalign: --resume needs --output", file=sys.stderr)
        return 2
    todo = [p for p in inputs if p not in done]
    if done:
        print(f"qalign: resuming: {len(done)} already in {args.output}, {len(todo)} to score", file=sys.stderr)

    from ..models.base import UnsupportedTask
    from ..models.registry import load_scorer

    from ..scoring import VideoOptions

    try:
        kwargs = {"max_pixels": args.max_pixels} if args.max_pixels else {}
        kwargs["video"] = VideoOptions(fps=args.fps, frames=args.frames, max_frames=args.max_frames or None)
        scorer = wrap(load_scorer(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, **kwargs))
        scorer.backend.check_task(args.task)
    except (UnsupportedTask, ValueError, FileNotFoundError, OSError) as exc:
        print(f"qalign: {exc}", file=sys.stderr)
        return 2

    writer = _RowWriter(Path(args.output), _file_kind(Path(args.output))) if args.output else None
    frame_writer = None
    if args.per_frame:
        frame_path = Path(args.per_frame)
        if frame_path.exists() and not args.resume:
            frame_path.unlink()
        frame_fields = ("path", "frame_index", "time_s", "score_1_5", *PROB_FIELDS)
        frame_writer = _RowWriter(frame_path, _file_kind(frame_path), frame_fields)
        if scorer.backend.info.video == "native":
            print(f"qalign: note: {scorer.backend.info.name} judges a video as a whole (native video mode); "
                  f"{args.per_frame} gets no per-frame rows", file=sys.stderr)
    rows = []
    failed = 0
    try:
        for row in scorer.iter_score(todo, task=args.task, progress=len(todo) > 1):
            if writer:
                writer.write(row.as_dict())
            if frame_writer:
                for f in row.per_frame:
                    frame_writer.write({"path": row.path, "frame_index": f.index, "time_s": round(f.time, 4),
                                        "score_1_5": f.score, **dict(zip(PROB_FIELDS, f.probs))})
            if fmt != "none":
                rows.append(row)
            if row.error:
                failed += 1
                print(f"qalign: error: {row.error}", file=sys.stderr)
            for w in row.warnings:
                print(f"qalign: warning: {row.path}: {w}", file=sys.stderr)
    finally:
        for w in (writer, frame_writer):
            if w:
                w.close()
    _print_rows(rows, fmt, ROW_FIELDS)
    if failed:
        print(f"qalign: {failed} of {len(todo)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise SystemExit(f"qalign: --output must end in .csv or .jsonl, got {path}")
    return suffix[1:]


def _finished_paths(path: Path, kind: str) -> set[str]:
    """Paths already in an output file. A last line cut by a kill (no newline) is removed."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    text = data.decode("utf-8")
    if kind == "jsonl":
        return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}
    return {row["path"] for row in csv.DictReader(io.StringIO(text))}


class _RowWriter:
    """Appends one row per line and flushes it, so a killed run loses at most a partial line."""

    def __init__(self, path: Path, kind: str, fields=None):
        from ..scoring import ROW_FIELDS

        self.kind = kind
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.file, fieldnames=fields or ROW_FIELDS) if kind == "csv" else None
        if self.csv and new:
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv:
            self.csv.writerow(row)
        else:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _print_rows(rows, fmt: str, fields) -> None:
    if fmt == "none" or not rows:
        return
    dicts = [r.as_dict() for r in rows]
    if fmt == "json":
        print(json.dumps(dicts, indent=2))
    elif fmt == "jsonl":
        for d in dicts:
            print(json.dumps(d))
    elif fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=fields)
        w.writeheader()
        w.writerows(dicts)
    else:
        print(_table(rows))


def _table(rows) -> str:
    from ..levels import LEVELS

    head = ["path", "score [1-5]", "level", *[f"p({w})" for w in LEVELS], "error"]
    body = []
    for r in rows:
        if r.ok:
            body.append([r.path, f"{r.score:.3f}", r.level, *[f"{p:.3f}" for p in r.probs], ""])
        else:
            body.append([r.path, "-", "-", *["-"] * len(LEVELS), r.error])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    widths[-1] = min(widths[-1], 80)
    line = lambda cells: "  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
