"""`qalign models` (known names) and `qalign setup` (convert the tiny model's bases now)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list known model names and what they cover")
    p.set_defaults(func=cmd_models)
    s = sub.add_parser("setup", help="convert qalign-tiny's pretrained bases now (first run is otherwise slower)")
    s.set_defaults(func=cmd_setup)


def cmd_models(args) -> int:
    from ..models.registry import known

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
    from ..models.tiny import bases

    bases.prepare()
    print(f"qalign: bases ready in {bases._bases_dir()}")
    return 0
