"""Metrics, the logistic fit, the bootstrap CI, direction handling and the report files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from qalign.data.labels import LabelRecord, LabelSet
from qalign.evaluate import (
    bootstrap_srcc_ci, comparison_table, evaluate, fit_logistic4, logistic4, metrics, write_report,
)


def _records(scores, prefix="img"):
    return [LabelRecord(f"{prefix}/{i}.png", float(s)) for i, s in enumerate(scores)]


def test_hand_computed_values():
    # y is x with two neighbouring swaps: d = (-1, 1, -1, 1, 0) -> SRCC = 1 - 6*4/(5*24) = 0.8;
    # 2 discordant of 10 pairs -> KRCC = (8 - 2)/10 = 0.6; centred products sum 8 over 10 -> PLCC 0.8
    m = metrics([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert m["n"] == 5
    assert m["srcc"] == pytest.approx(0.8)
    assert m["krcc"] == pytest.approx(0.6)
    assert m["plcc"] == pytest.approx(0.8)


def test_metrics_match_scipy_on_random_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    y = np.tanh(x) + rng.normal(scale=0.3, size=300)
    m = metrics(x, y)
    assert m["srcc"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert m["krcc"] == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)
    assert m["plcc"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    fitted = m["fit"](x)
    assert m["rmse_fit"] == pytest.approx(np.sqrt(np.mean((fitted - y) ** 2)))
    assert m["plcc_fit"] == pytest.approx(stats.pearsonr(fitted, y)[0])
    assert m["plcc_fit"] > m["plcc"]  # tanh is what the logistic can straighten


def test_logistic_fit_recovers_parameters():
    rng = np.random.default_rng(2)
    x = np.linspace(-3, 4, 400)
    true = (5.0, 1.0, 0.5, 0.7)
    y = logistic4(x, *true) + rng.normal(scale=0.01, size=x.size)
    fit = fit_logistic4(x, y)
    assert fit.method == "logistic4"
    b1, b2, b3, b4 = fit.params
    assert b1 == pytest.approx(5.0, abs=0.03)
    assert b2 == pytest.approx(1.0, abs=0.03)
    assert b3 == pytest.approx(0.5, abs=0.03)
    assert abs(b4) == pytest.approx(0.7, abs=0.03)
    m = metrics(x, y)
    assert m["rmse_fit"] == pytest.approx(0.01, abs=0.003)
    assert m["plcc_fit"] > 0.999 > m["plcc"]


def test_fit_falls_back_safely():
    x = np.linspace(0, 1, 50)
    y = 2 * x + 1
    f = fit_logistic4(x, y, maxfev=1)  # cannot converge in one evaluation
    assert f.method == "linear" and "failed" in f.note
    assert f.params == pytest.approx((2.0, 1.0))
    const = metrics(np.ones(20), np.arange(20.0))  # constant predictions: nothing to fit
    assert const["fit"].method == "linear"
    assert math.isnan(const["srcc"]) and math.isnan(const["plcc"])


def test_bootstrap_ci_contains_estimate_seeded_and_narrows():
    rng = np.random.default_rng(3)

    def sample(n):
        x = rng.normal(size=n)
        return x, x + rng.normal(scale=1.0, size=n)

    xs, ys = sample(60)
    lo, hi = bootstrap_srcc_ci(xs, ys, n_boot=500, seed=7)
    point = stats.spearmanr(xs, ys)[0]
    assert lo < point < hi
    assert (lo, hi) == bootstrap_srcc_ci(xs, ys, n_boot=500, seed=7)
    assert (lo, hi) != bootstrap_srcc_ci(xs, ys, n_boot=500, seed=8)
    xl, yl = sample(3000)
    lo2, hi2 = bootstrap_srcc_ci(xl, yl, n_boot=300, seed=7)
    assert lo2 < stats.spearmanr(xl, yl)[0] < hi2
    assert (hi2 - lo2) < 0.4 * (hi - lo)  # width shrinks like 1/sqrt(n)


def test_direction_flips_for_dmos_and_lower_is_better_models():
    rng = np.random.default_rng(4)
    quality = rng.uniform(0, 1, 200)
    dmos = 100 * (1 - quality) + rng.normal(scale=5, size=200)     # lower is better
    recs = _records(dmos)
    labels = LabelSet(recs, name="LIVE-like", lower_is_better=True, score_range=(dmos.min(), dmos.max()))
    good_model = {r.path: q + rng.normal(scale=0.05) for r, q in zip(recs, quality)}  # higher = better
    raw = stats.spearmanr([good_model[r.path] for r in recs], dmos)[0]
    assert raw < -0.8
    res = evaluate(good_model, labels, name="m", n_boot=200)
    assert res.sign == -1 and res.labels_lower_is_better
    assert res.srcc == pytest.approx(-raw)
    assert res.plcc > 0.8 and res.krcc > 0.6 and res.srcc_ci[0] > 0.8
    # a lower-is-better model on DMOS labels: same direction, nothing flipped
    brisque_like = {k: -v for k, v in good_model.items()}
    res2 = evaluate(brisque_like, labels, model_lower_is_better=True, n_boot=200)
    assert res2.sign == 1 and res2.srcc == pytest.approx(-raw)
    # a lower-is-better model on MOS labels: flipped
    mos = LabelSet(_records(-dmos), lower_is_better=False)
    res3 = evaluate(brisque_like, mos, model_lower_is_better=True, n_boot=200)
    assert res3.sign == -1 and res3.srcc == pytest.approx(-raw)
    # and without telling it about the DMOS, the agreement shows up negative
    assert evaluate(good_model, recs, n_boot=50).srcc == pytest.approx(raw)


def test_missing_predictions_are_counted_and_basename_fallback():
    recs = _records([1, 2, 3, 4, 5, 6], prefix="KonIQ-10k/1024x768")
    preds = {f"/abs/elsewhere/{i}.png": float(i) for i in range(5)}  # no exact keys; item 5 missing
    preds["/abs/elsewhere/unrelated.png"] = 9.0
    res = evaluate(preds, recs, n_boot=50)
    assert res.n == 5 and res.n_missing == 1 and res.missing == ["KonIQ-10k/1024x768/5.png"]
    assert res.n_unlabelled == 1
    assert res.srcc == pytest.approx(1.0)
    res_nan = evaluate({r.path: (math.nan if i == 0 else float(i)) for i, r in enumerate(recs)}, recs, n_boot=50)
    assert res_nan.n == 5 and res_nan.n_missing == 1


def _two_results():
    rng = np.random.default_rng(5)
    y = rng.uniform(1, 5, 150)
    recs = _records(y)
    a = evaluate({r.path: v + rng.normal(scale=0.3) for r, v in zip(recs, y)}, recs, name="model A", n_boot=200)
    b = evaluate({r.path: -v + rng.normal(scale=1.0) for r, v in zip(recs, y)}, recs, name="niqe",
                 model_lower_is_better=True, n_boot=200)
    return recs, a, b


def test_comparison_table():
    _, a, b = _two_results()
    t = comparison_table([a, b])
    lines = t.splitlines()
    assert lines[0].startswith("| model") and "SRCC [95% CI]" in lines[0] and "RMSE(fit)" in lines[0]
    assert lines[2].startswith("| model A") and "| 150 " in lines[2]
    assert f"{a.srcc:.4f} [{a.srcc_ci[0]:.3f}, {a.srcc_ci[1]:.3f}]" in lines[2]
    assert lines[3].startswith("| niqe") and f"{b.plcc_fit:.4f}" in lines[3]
    assert "negated" in t


def _png_ok(path):
    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert arr.shape[0] > 100 and arr.shape[1] > 100
    assert arr.std() > 10  # not blank
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20


def test_write_report(tmp_path):
    recs, a, b = _two_results()
    rng = np.random.default_rng(6)
    probs = {r.path: rng.dirichlet(np.ones(5)) for r in recs}
    extra = {recs[0].path: {"split": "test"}}
    written = write_report(tmp_path / "rep", [a, b], per_item=extra, level_probs={"model A": probs})
    doc = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [r["name"] for r in doc["results"]] == ["model A", "niqe"]
    assert doc["results"][0]["n"] == 150 and doc["results"][1]["sign"] == -1
    assert doc["results"][0]["srcc"] == pytest.approx(a.srcc)
    with open(tmp_path / "rep" / "per_item.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150
    assert set(rows[0]) >= {"path", "human", "model A", "model A_fit", "niqe", "niqe_fit", "split"}
    assert rows[0]["split"] == "test" and rows[1]["split"] == ""
    assert float(rows[3]["human"]) == pytest.approx(recs[3].score)
    assert float(rows[3]["niqe"]) == pytest.approx(b.pred[3])
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs == ["levels_model_A.png", "scatter_model_A.png", "scatter_niqe.png"]
    for p in pngs:
        _png_ok(tmp_path / "rep" / p)
    assert written["results"].name == "results.json"
    # single model, probabilities keyed by path directly
    write_report(tmp_path / "one", a, level_probs=probs)
    assert (tmp_path / "one" / "levels_model_A.png").exists()
