"""The ``qalign`` command: score, models, setup, train, data, eval, serve, bench.

Heavy modules are imported inside each command so that ``qalign --help`` answers at once.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from . import __version__


# ----------------------------------------------------------------------------- score

def _add_score(sub) -> None:
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
    p.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    from .scoring import ROW_FIELDS, expand_inputs

    inputs = expand_inputs(args.paths, recursive=args.recursive)
    if not inputs:
        print("qalign: no input files found", file=sys.stderr)
        return 2
    fmt = args.format or ("none" if args.output else "table")
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

    from .models.base import UnsupportedTask
    from .models.registry import load_scorer

    try:
        kwargs = {"max_pixels": args.max_pixels} if args.max_pixels else {}
        scorer = load_scorer(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, **kwargs)
        scorer.backend.check_task(args.task)
    except (UnsupportedTask, ValueError, FileNotFoundError, OSError) as exc:
        print(f"qalign: {exc}", file=sys.stderr)
        return 2

    writer = _RowWriter(Path(args.output), _file_kind(Path(args.output))) if args.output else None
    rows = []
    failed = 0
    try:
        for row in scorer.iter_score(todo, task=args.task, progress=len(todo) > 1):
            if writer:
                writer.write(row.as_dict())
            if fmt != "none":
                rows.append(row)
            if row.error:
                failed += 1
                print(f"qalign: error: {row.error}", file=sys.stderr)
            for w in row.warnings:
                print(f"qalign: warning: {row.path}: {w}", file=sys.stderr)
    finally:
        if writer:
            writer.close()
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

    def __init__(self, path: Path, kind: str):
        from .scoring import ROW_FIELDS

        self.kind = kind
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.file, fieldnames=ROW_FIELDS) if kind == "csv" else None
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
    from .levels import LEVELS

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


# ----------------------------------------------------------------------------- models / setup

def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list known model names and what they cover")
    p.set_defaults(func=cmd_models)
    s = sub.add_parser("setup", help="convert qalign-tiny's pretrained bases now (first run is otherwise slower)")
    s.set_defaults(func=cmd_setup)


def cmd_models(args) -> int:
    from .models.registry import known

    rows = [["name", "tasks", "video", "source", "notes"]]
    for e in known().values():
        rows.append([e.name, ",".join(e.tasks), e.video, e.source, e.notes])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def cmd_setup(args) -> int:
    from .models.tiny import bases

    bases.prepare()
    print(f"qalign: bases ready in {bases._bases_dir()}")
    return 0


# ----------------------------------------------------------------------------- train

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model on opinion scores (Q-Align syllabus or soft labels)")
    p.add_argument("--data", required=True, help="labels file: CSV/JSONL with path, score[, std, split]")
    p.add_argument("--images", help="root folder of the image paths (default: the labels file's folder)")
    p.add_argument("--model", default="qalign-tiny-base",
                   help="qalign-tiny-base (fresh abstractor on the bases), qalign-tiny, or a qalign-tiny folder")
    p.add_argument("--output", required=True)
    p.add_argument("--task", default="quality", choices=["quality", "aesthetics"])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora", dest="lora", action="store_true", default=True, help="LoRA on the LLM (default)")
    p.add_argument("--no-lora", dest="lora", action="store_false", help="train the abstractor only")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--soft-labels", action="store_true", help="DeQA-Score soft labels (KL at the level token)")
    p.add_argument("--dmos", action="store_true", help="labels are lower-is-better")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "no"])
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(data=args.data, images=args.images, model=args.model, output=args.output, task=args.task,
                      epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                      lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_targets=tuple(args.lora_targets.split(",")), soft_labels=args.soft_labels,
                      lower_is_better=args.dmos, seed=args.seed, save_every=args.save_every,
                      mixed_precision=args.mixed_precision)
    train(cfg)
    return 0


# ----------------------------------------------------------------------------- data

def _add_data(sub) -> None:
    p = sub.add_parser("data", help="data tools: synthetic corpus")
    dsub = p.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="build the KADID-style synthetic-distortion corpus from pristine photos")
    from .data import synthetic

    synthetic.add_arguments(synth)
    synth.set_defaults(func=lambda a: synthetic.run(a))


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qalign", description="Q-Align quality / aesthetics scoring with LMMs")
    parser.add_argument("--version", action="version", version=f"qalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_score(sub)
    _add_models(sub)
    _add_train(sub)
    _add_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
