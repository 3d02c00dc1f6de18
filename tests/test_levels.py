"""The Q-Align syllabus (score -> level), the close-set softmax (levels -> score) and soft labels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qalign import levels as L

# Inner bin edges read off the released training files (method.md, section 1). They are rounded
# to 2-3 decimals in the source, so the range [m, M] is derived from the outer two edges and the
# inner two are checked against equal-width bins with a tolerance of 0.5 % of the range.
RELEASED_EDGES = {
    "koniq": [22.41, 38.14, 53.89, 69.62],
    "spaq": [18.8, 37.6, 56.4, 75.2],
    "kadid": [1.82, 2.59, 3.36, 4.115],
}


def derived_range(edges):
    width = (edges[3] - edges[0]) / 3.0
    return edges[0] - width, edges[3] + width


@pytest.mark.parametrize("name", sorted(RELEASED_EDGES))
def test_level_edges_reproduce_released_bins(name):
    quoted = RELEASED_EDGES[name]
    low, high = derived_range(quoted)
    edges = L.level_edges(low, high)
    assert len(edges) == 4
    assert edges == pytest.approx(quoted, abs=0.005 * (high - low))
    # ... and the released edges fall into the right bins: just above edge k is level k.
    for k, quoted_edge in enumerate(quoted):
        assert L.level_of(quoted_edge + 0.01 * (high - low), low, high) == k + 1


def test_spaq_range_0_94_gives_exact_edges():
    assert L.level_edges(0.0, 94.0) == pytest.approx([18.8, 37.6, 56.4, 75.2], abs=1e-9)


def test_koniq_derived_range_is_plausible():
    low, high = derived_range(RELEASED_EDGES["koniq"])
    assert low == pytest.approx(6.67, abs=0.02)
    assert high == pytest.approx(85.36, abs=0.02)


@pytest.mark.parametrize("low,high", [(0.0, 94.0), (6.68, 85.35), (1.0, 4.93), (0.0, 1.0), (-3.0, 7.0)])
def test_bins_upper_edge_inclusive_lowest_edge_inclusive(low, high):
    edges = L.level_edges(low, high)
    assert L.level_of(low, low, high) == 0  # the lowest edge belongs to "bad"
    assert L.level_of(high, low, high) == 4
    eps = 1e-6 * (high - low)
    for k, edge in enumerate(edges):
        # m + (i-1)w < s <= m + iw: an edge belongs to the bin below it.
        assert L.level_of(edge, low, high) == k
        assert L.level_of(edge + eps, low, high) == k + 1
        assert L.level_of(edge - eps, low, high) == k


def test_spaq_levels_by_hand():
    got = [L.level_of(s, 0, 94) for s in (0, 10, 18.8, 18.81, 40, 56.4, 60, 75.2, 75.21, 94)]
    assert got == [0, 0, 0, 1, 2, 2, 3, 3, 4, 4]


def test_dmos_flip():
    low, high = 0.0, 100.0
    # Lower is better: the smallest DMOS is excellent, the largest is bad.
    assert L.level_of(0.0, low, high, lower_is_better=True) == 4
    assert L.level_of(100.0, low, high, lower_is_better=True) == 0
    for s in (3.0, 25.0, 41.0, 50.0, 66.0, 79.0, 97.0):
        assert L.level_of(s, low, high, lower_is_better=True) == 4 - L.level_of(s, low, high)
    assert L.normalise_score(10.0, low, high, lower_is_better=True) == pytest.approx(4.6)
    assert L.normalise_score(10.0, low, high) == pytest.approx(1.4)


def test_level_of_rejects_bad_ranges_and_outliers():
    with pytest.raises(ValueError):
        L.level_of(3.0, 5.0, 5.0)
    with pytest.raises(ValueError):
        L.level_of(3.0, 5.0, 1.0)
    with pytest.raises(ValueError, match="outside"):
        L.level_of(101.0, 0.0, 100.0)
    with pytest.raises(ValueError, match="outside"):
        L.level_of(-0.5, 0.0, 100.0)


def test_normalise_score_is_linear_onto_1_5():
    assert L.normalise_score(0.0, 0.0, 100.0) == pytest.approx(1.0)
    assert L.normalise_score(100.0, 0.0, 100.0) == pytest.approx(5.0)
    assert L.normalise_score(50.0, 0.0, 100.0) == pytest.approx(3.0)
    assert L.normalise_score(3.0, 1.0, 5.0) == pytest.approx(3.0)


def test_levels_and_weights():
    assert L.LEVELS == ("bad", "poor", "fair", "good", "excellent")
    assert [L.level_to_score(i) for i in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [L.level_word(i) for i in range(5)] == list(L.LEVELS)
    assert L.histogram([0, 4, 4, 2]) == {"bad": 1, "poor": 0, "fair": 1, "good": 0, "excellent": 2}


def test_softmax_over_five():
    logits = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    p = L.softmax(logits)
    assert p.shape == (2, 5)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
    e = np.exp(logits[0])
    np.testing.assert_allclose(p[0], e / e.sum(), rtol=1e-12)
    np.testing.assert_allclose(p[1], 0.2, atol=1e-12)
    # Shift invariant and stable for huge logits (no overflow to nan).
    np.testing.assert_allclose(L.softmax(logits[0] + 1000.0), p[0], rtol=1e-12)
    big = L.softmax(np.array([1000.0, -1000.0, 0.0, 0.0, 0.0]))
    assert np.isfinite(big).all() and big[0] == pytest.approx(1.0)


def test_expectation_weights():
    eye = np.eye(5)
    np.testing.assert_allclose(L.probabilities_to_score(eye), [1, 2, 3, 4, 5])
    assert L.probabilities_to_score(np.full(5, 0.2)) == pytest.approx(3.0)
    assert L.probabilities_to_score(np.array([0.5, 0, 0, 0, 0.5])) == pytest.approx(3.0)
    assert L.probabilities_to_score(np.array([0.0, 0, 0, 0.5, 0.5])) == pytest.approx(4.5)


def test_logits_to_scores_orders_bad_to_excellent():
    # A model sure of "excellent" (last logit) scores near 5; sure of "bad" near 1.
    probs, scores = L.logits_to_scores(np.array([[0, 0, 0, 0, 20.0], [20.0, 0, 0, 0, 0], [0, 0, 20.0, 0, 0]]))
    np.testing.assert_allclose(scores, [5.0, 1.0, 3.0], atol=1e-6)
    np.testing.assert_allclose(scores, probs @ np.arange(1, 6))


def test_unit_range_mapping():
    assert L.to_unit_range(1.0) == 0.0
    assert L.to_unit_range(5.0) == 1.0
    assert L.to_unit_range(3.0) == 0.5
    assert L.from_unit_range(0.25) == 2.0
    x = np.linspace(1, 5, 17)
    np.testing.assert_allclose(L.from_unit_range(L.to_unit_range(x)), x)
    # Upstream's [1, .75, .5, .25, 0] weights (excellent..bad) give the [0, 1] form of the same number.
    rng = np.random.default_rng(0)
    p = L.softmax(rng.normal(size=(8, 5)))
    np.testing.assert_allclose(p @ np.array([0, 0.25, 0.5, 0.75, 1.0]), L.to_unit_range(L.probabilities_to_score(p)))


@pytest.mark.parametrize("mu", [1.0, 1.2, 1.9, 2.5, 3.0, 3.37, 4.1, 4.8, 5.0])
@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.7, 1.5])
def test_soft_label_is_a_distribution_with_exact_mean(mu, sigma):
    p = L.soft_label(mu, sigma)
    assert p.shape == (5,)
    assert (p >= 0).all()
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert float(p @ L.WEIGHTS_1_5) == pytest.approx(mu, abs=1e-9)


@pytest.mark.parametrize("mu,peak", [(1.1, 0), (2.2, 1), (2.9, 2), (3.6, 3), (4.7, 4)])
def test_soft_label_peaks_at_the_nearest_level(mu, peak):
    assert int(np.argmax(L.soft_label(mu, 0.5))) == peak


def test_soft_label_wider_std_is_flatter():
    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    labels = [L.soft_label(3.3, s) for s in (0.1, 0.4, 0.8, 1.6)]
    peaks = [p.max() for p in labels]
    ents = [entropy(p) for p in labels]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))
    assert all(a < b for a, b in zip(ents, ents[1:]))
    # Near-zero std: essentially one-hot... up to the mean correction.
    sharp = L.soft_label(4.0, 0.01)
    assert sharp[3] > 0.99


def test_soft_label_is_symmetric_about_fair():
    p = L.soft_label(2.3, 0.6)
    q = L.soft_label(3.7, 0.6)
    np.testing.assert_allclose(p, q[::-1], atol=1e-12)


def test_soft_label_maps_the_dataset_scale():
    # KonIQ-style 0..100 MOS with std 10 -> mean 3 and std 0.4 on the level scale.
    np.testing.assert_allclose(L.soft_label(50.0, 10.0, low=0.0, high=100.0), L.soft_label(3.0, 0.4), atol=1e-12)
    p = L.soft_label(80.0, 5.0, low=0.0, high=100.0)
    assert float(p @ L.WEIGHTS_1_5) == pytest.approx(4.2, abs=1e-9)
    assert not math.isnan(p.sum())
