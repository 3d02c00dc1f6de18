"""`qalign train`: fine-tune on opinion scores."""

from __future__ import annotations


def register(sub) -> None:
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
    from ..train import TrainConfig, train

    cfg = TrainConfig(data=args.data, images=args.images, model=args.model, output=args.output, task=args.task,
                      epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                      lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_targets=tuple(args.lora_targets.split(",")), soft_labels=args.soft_labels,
                      lower_is_better=args.dmos, seed=args.seed, save_every=args.save_every,
                      mixed_precision=args.mixed_precision)
    train(cfg)
    return 0
