"""The Q-Align syllabus: five rating words, score <-> level, level probabilities -> score.

Pure Python + numpy; no torch. Everything is ordered worst to best (``bad`` .. ``excellent``)
so that index ``i`` has weight ``i + 1`` on the [1, 5] scale.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

LEVELS: tuple[str, ...] = ("bad", "poor", "fair", "good", "excellent")
WEIGHTS_1_5 = np.array([1.0, 2.0, 3.0, 4.0, 5.0])

# The two score ranges users meet. Q-Align's HF ``score()`` gives [1, 5]; its ``QAlignScorer``
# and Q-ReAlign give [0, 1]. They are the same number up to y = 4x + 1.
RANGES = ("1-5", "0-1")


def to_unit_range(score_1_5: float | np.ndarray) -> float | np.ndarray:
    """Map a [1, 5] score to [0, 1]."""
    return (score_1_5 - 1.0) / 4.0


def from_unit_range(score_0_1: float | np.ndarray) -> float | np.ndarray:
    """Map a [0, 1] score to [1, 5]."""
    return 4.0 * score_0_1 + 1.0


def level_of(score: float, low: float, high: float, *, lower_is_better: bool = False) -> int:
    """Level index 0..4 (bad..excellent) of ``score`` in a dataset whose scores span [low, high].

    Q-Align cuts [low, high] into five equal-width bins; the lowest edge is inclusive.
    For DMOS data (lower is better) the scale is flipped first.
    """
    if not high > low:
        raise ValueError(f"score range must have high > low, got [{low}, {high}]")
    if lower_is_better:
        score = low + high - score
    if not (low - 1e-9 <= score <= high + 1e-9):
        raise ValueError(f"score {score} lies outside the dataset range [{low}, {high}]")
    width = (high - low) / 5.0
    # Bin i (1-based) holds low + (i-1)w < s <= low + iw; ceil gives that i directly.
    i = math.ceil((score - low) / width - 1e-12)
    return min(max(i, 1), 5) - 1


def level_edges(low: float, high: float) -> list[float]:
    """The four inner bin edges of [low, high] (e.g. KonIQ 0-100 -> 22.41/38.14/...)."""
    width = (high - low) / 5.0
    return [low + k * width for k in range(1, 5)]


def level_word(index: int) -> str:
    return LEVELS[index]


def level_to_score(index: int) -> float:
    """The [1, 5] score a single level stands for (bad = 1 ... excellent = 5)."""
    return float(index + 1)


def normalise_score(score: float, low: float, high: float, *, lower_is_better: bool = False) -> float:
    """Map a dataset score onto the [1, 5] level scale (linear, flipped for DMOS)."""
    unit = (score - low) / (high - low)
    if lower_is_better:
        unit = 1.0 - unit
    return 1.0 + 4.0 * unit


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64 (the close-set softmax over the five level logits)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities_to_score(probs: np.ndarray) -> np.ndarray:
    """Expectation of the level weights 1..5: a score in [1, 5] per row."""
    return np.asarray(probs, dtype=np.float64) @ WEIGHTS_1_5


def logits_to_scores(level_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Five level logits per row (bad..excellent) -> (probabilities, score in [1, 5])."""
    probs = softmax(level_logits)
    return probs, probabilities_to_score(probs)


def soft_label(mean: float, std: float, *, low: float = 1.0, high: float = 5.0) -> np.ndarray:
    """DeQA-Score soft label: a discretised Gaussian over the five levels with the given mean.

    ``mean`` and ``std`` are on the dataset scale [low, high]; both are mapped to [1, 5].
    The Gaussian is integrated over each level's unit bin (centres 1..5), then adjusted so the
    probabilities sum to one and their expectation equals the mean exactly.
    """
    scale = 4.0 / (high - low)
    mu = 1.0 + (mean - low) * scale
    sigma = max(std * scale, 1e-3)
    centres = WEIGHTS_1_5
    edges = np.concatenate([[-np.inf], centres[:-1] + 0.5, [np.inf]])
    cdf = np.array([_normal_cdf((e - mu) / sigma) for e in edges])
    p = np.clip(np.diff(cdf), 0.0, None)
    p = p / p.sum()
    return _match_mean(p, mu)


def _normal_cdf(z: float) -> float:
    if math.isinf(z):
        return 0.0 if z < 0 else 1.0
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _match_mean(p: np.ndarray, mu: float) -> np.ndarray:
    """Smallest change to ``p`` (mixing with a two-point distribution) that makes E[p] == mu."""
    mu = min(max(mu, 1.0), 5.0)
    current = float(p @ WEIGHTS_1_5)
    if abs(current - mu) < 1e-12:
        return p
    # Discretising and truncating the Gaussian pulls its mean towards 3; mix in a little of the
    # end level on mu's side: q = (1 - a) p + a t with a chosen so that E[q] = mu exactly.
    target = np.zeros(5)
    target[4 if mu > current else 0] = 1.0
    a = (mu - current) / (float(target @ WEIGHTS_1_5) - current)
    q = (1.0 - a) * p + a * target
    return q / q.sum()


def histogram(levels: Sequence[int]) -> dict[str, int]:
    counts = {word: 0 for word in LEVELS}
    for i in levels:
        counts[LEVELS[i]] += 1
    return counts
