"""Human labels -> Q-Align training records (one JSON object per line).

    labels (any format :func:`qalign.data.labels.read_labels` reads)
    -> level per item from the WHOLE file's score range [m, M] (Q-Align's syllabus, DMOS flipped;
       a file that mixes datasets is binned per dataset, on each one's own range and direction)
    -> a conversation: a training-question paraphrase + the image placeholder, and the answer
       "The quality of the image is good."

Each output line is read back by ``read_labels`` (and so by ``qalign train --data``): ``path``
(absolute, as found under the images root), ``score`` on the source's own scale, ``std``,
``split``, ``source`` and a ``lower_is_better`` flag that keeps the direction on a round trip.
The level (index and word), the range used, the task, the input kind and the conversation ride
along. Records whose file is missing are listed (returned, and written to ``OUT.missing.txt`` by
:func:`convert`), never dropped silently.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..levels import LEVELS, level_edges, level_of
from ..prompts import IMAGE_PLACEHOLDER, answer, training_questions
from .labels import LabelRecord, LabelSet, read_labels, resolve

__all__ = ["Binning", "ConvertResult", "binning_sets", "training_record", "convert", "input_kind_of", "missing_list_path", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .qt .mkv .webm .avi .ts .mts .m2ts .flv .wmv .asf .mpg .mpeg .3gp .ogv .y4m .ivf".split())


def input_kind_of(record: LabelRecord) -> str:
    """``"video"`` for a record of a video label list (it has fps/duration) or a video file extension,
    else ``"image"``."""
    extra = record.extra or {}
    if "fps" in extra or "duration" in extra:
        return "video"
    return "video" if Path(record.path).suffix.lower() in VIDEO_EXTENSIONS else "image"


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return str(v)


def training_record(record: LabelRecord, labels: LabelSet, *, path: str | None = None, task: str = "quality",
                    input_kind: str | None = None, rng: random.Random | None = None) -> dict[str, Any]:
    """One training record for ``record`` of ``labels``; its level comes from ``labels``' whole range."""
    kind = input_kind or input_kind_of(record)
    low, high = labels.score_range
    index = level_of(record.score, low, high, lower_is_better=labels.lower_is_better)
    word = LEVELS[index]
    questions = training_questions(task, kind)
    q = (rng or random.Random(0)).choice(questions)
    out: dict[str, Any] = {
        "path": path or record.path,
        "image": record.path,  # as the labels source writes it (upstream Q-Align files use this key)
        "task": task,
        "input": kind,
        "score": record.score,
        "std": record.std,
        "split": record.split,
        "lower_is_better": bool(labels.lower_is_better),
        "score_range": [low, high],
        "level": index,
        "level_word": word,
        "conversations": [
            {"from": "human", "value": f"{q}\n{IMAGE_PLACEHOLDER}"},
            {"from": "gpt", "value": answer(word, task, kind)},
        ],
    }
    if record.source:
        out["source"] = record.source
    extra = dict(record.extra or {})
    if "ref" in extra:  # content key of synthetic datasets (content-disjoint splits)
        out["ref"] = extra.pop("ref")
    if extra:
        out["meta"] = _json_value(extra)
    return out


def missing_list_path(output: str | os.PathLike) -> Path:
    """``train.jsonl`` -> ``train.missing.txt``."""
    out = Path(output)
    return out.with_name(out.stem + ".missing.txt")


@dataclass
class Binning:
    """The range and direction one dataset's levels come from."""

    name: str | None
    score_range: tuple[float, float]
    lower_is_better: bool
    direction_source: str
    n_items: int

    def describe(self) -> str:
        low, high = self.score_range
        edges = " / ".join(f"{e:.6g}" for e in level_edges(low, high))
        direction = "lower is better (flipped before binning)" if self.lower_is_better else "higher is better"
        who = f"{self.name}: " if self.name else ""
        return (f"{who}score range [m, M] = [{low:.6g}, {high:.6g}] over the whole labels source "
                f"({self.n_items} items); {direction} ({self.direction_source}); level edges {edges}")


@dataclass
class ConvertResult:
    output: Path
    written: int
    missing: list[str]  # label paths (as the source writes them) whose file was not found
    missing_file: Path | None
    binnings: list[Binning]  # one, or one per dataset of a mixed file
    histogram: list[int]  # written records per level, bad .. excellent
    n_labels: int  # records in the whole labels source
    n_selected: int  # records after the split filter
    inputs: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def score_range(self) -> tuple[float, float]:
        return self.binnings[0].score_range

    @property
    def lower_is_better(self) -> bool:
        return self.binnings[0].lower_is_better

    def summary(self) -> str:
        lines = [b.describe() for b in self.binnings]
        if len(self.binnings) > 1:
            lines.insert(0, f"{len(self.binnings)} datasets in one file: each binned on its own range and direction")
        lines.append(f"level histogram of the {self.written} written records:")
        top = max(self.histogram) if any(self.histogram) else 1
        for word, count in zip(LEVELS, self.histogram):
            bar = "#" * int(round(30 * count / top)) if count else ""
            lines.append(f"  {word:<10} {count:>7}  {bar}")
        if self.inputs:
            lines.append("inputs: " + ", ".join(f"{k} {v}" for k, v in sorted(self.inputs.items())))
        return "\n".join(lines)


def binning_sets(labels: LabelSet, *, explicit_lower_is_better: bool | None = None) -> dict[str | None, LabelSet]:
    """The label set each record's level comes from: the whole set, or, for a file that mixes
    datasets (a ``source``/``dataset`` column with several values), each dataset's own records
    (own range; own direction from the dataset table unless given explicitly). Key ``None`` is the
    set for records without a source."""
    sources = labels.sources()
    if len(sources) <= 1:
        return {None: labels}
    out: dict[str | None, LabelSet] = {}
    for name in sources:
        sub = labels.by_source(name)
        if explicit_lower_is_better is not None:
            sub = replace(sub, lower_is_better=bool(explicit_lower_is_better), direction_source="explicit")
        out[name] = sub
    rest = [r for r in labels.records if not r.source]
    if rest:
        scores = [r.score for r in rest]
        out[None] = replace(labels, records=rest, score_range=(min(scores), max(scores)), notes=[])
    return out


def convert(source: str | os.PathLike, images: str | os.PathLike | None, output: str | os.PathLike, *,
            task: str = "quality", lower_is_better: bool | None = None, split: str | None = None,
            seed: int = 0, input_kind: str | None = None) -> ConvertResult:
    """Write training records for ``source`` (found under ``images``) to ``output`` (JSON Lines).

    The level of every record comes from the range of the WHOLE source (all splits, missing files
    included), as Q-Align's syllabus prescribes; a file that mixes datasets is binned per dataset.
    ``split`` keeps only that split's records. Missing files are returned and listed in
    ``OUT.missing.txt`` (a stale list is removed when nothing is missing). Raises ``ValueError``
    when no record is left to write or a range is empty.
    """
    labels = read_labels(source, lower_is_better=lower_is_better)
    sets = binning_sets(labels, explicit_lower_is_better=lower_is_better)
    for key, ls in sets.items():
        low, high = ls.score_range
        if not high > low:
            raise ValueError(f"{source}{f' ({key})' if key else ''}: every score is {low}: no range to cut into levels")
    selected = labels.by_split(split) if split is not None else labels
    if split is not None and not selected.records:
        splits = sorted({r.split for r in labels.records if r.split})
        raise ValueError(f"{source}: no records with split {split!r}; splits present: {', '.join(splits) or 'none'}")
    if images is None and os.path.isfile(source):
        images = Path(source).resolve().parent
    res = resolve(selected, images)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    missing_file = missing_list_path(output)
    if not res.records:
        raise ValueError(f"none of the {len(selected)} labelled files was found under {images}; "
                         f"e.g. {', '.join(res.missing_paths[:3])}")
    rng = random.Random(seed)
    histogram = [0] * len(LEVELS)
    inputs: dict[str, int] = {}
    # resolve() keeps the order of the found records; pair each with its original path.
    missing_set = set(res.missing)
    originals = [r for r in selected.records if r not in missing_set] if missing_set else selected.records
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for orig, found in zip(originals, res.records):
            ls = sets[orig.source if orig.source in sets else None]
            rec = training_record(orig, ls, path=found.path, task=task, input_kind=input_kind, rng=rng)
            histogram[rec["level"]] += 1
            inputs[rec["input"]] = inputs.get(rec["input"], 0) + 1
            f.write(json.dumps(_json_value(rec), ensure_ascii=False) + "\n")
    os.replace(tmp, output)
    if res.missing:
        missing_file.write_text("".join(p + "\n" for p in res.missing_paths), encoding="utf-8")
    elif missing_file.exists():
        missing_file.unlink()
    binnings = [Binning(key if len(sets) > 1 else None, ls.score_range, ls.lower_is_better, ls.direction_source,
                        len(ls)) for key, ls in sets.items()]
    return ConvertResult(
        output=output, written=len(res.records), missing=res.missing_paths,
        missing_file=missing_file if res.missing else None, binnings=binnings,
        histogram=histogram, n_labels=len(labels), n_selected=len(selected), inputs=inputs,
        notes=list(labels.notes),
    )
