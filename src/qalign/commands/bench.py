"""`qalign bench`: scoring speed, straightforward vs optimised, against the machine's peak (see qalign.bench)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure scoring speed: straightforward vs optimised path, FLOP/s vs the machine's peak",
        description="Measures, in one run on the same images: (a) the straightforward path (full-vocabulary "
                    "logits, no cache, batch 1), (b) the optimised path at batch 1, (c) at its best batch size, "
                    "(d) the whole Scorer on JPEG files; images/s, peak memory, FLOPs per image and FLOP/s against "
                    "a measured peak matmul. The last line is `speedup: X.XX` (best optimised / straightforward).")
    p.add_argument("--images", default=None, help="folder of images (default: ../shared/data/pristine beside the "
                                                  "repository, else generated images)")
    p.add_argument("--count", type=int, default=32, help="images to use (default 32)")
    p.add_argument("--model", default="qalign-tiny", help="qalign-tiny, a qalign-tiny or mPLUG-Owl2 folder, or an Owl2 name")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--task", default="quality", choices=["quality", "aesthetics"])
    p.add_argument("--batch-sizes", default="1,4,8,16,32", help="comma-separated batch sizes to try")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per measurement, the best is kept (default 2)")
    p.add_argument("--no-pipeline", action="store_true", help="skip (d), the end-to-end Scorer run on files")
    p.add_argument("--no-owl2", action="store_true", help="skip the full-size mPLUG-Owl2 run on CUDA")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .. import bench

    try:
        sizes = tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
        if not sizes or min(sizes) < 1 or args.count < 1:
            raise ValueError("batch sizes and --count must be positive integers")
    except ValueError as exc:
        print(f"qalign: {exc}", file=sys.stderr)
        return 2
    log = lambda s: print(f"qalign bench: {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        with bench._quiet_transformers():
            report = bench.run(images=args.images, count=args.count, model=args.model, device=args.device,
                               task=args.task, batch_sizes=sizes, repeats=args.repeats,
                               pipeline=not args.no_pipeline, owl2=not args.no_owl2, log=log)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"qalign: {exc}", file=sys.stderr)
        return 2
    bench.print_report(report)
    return 0
