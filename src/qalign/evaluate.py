"""Evaluate predicted scores against human labels the way the IQA papers do.

Metrics (scipy): SRCC (Spearman), KRCC (Kendall tau-b), PLCC on the raw predictions (what Q-Align
and pyiqa report), and PLCC / RMSE after the VQEG four-parameter logistic fit (what DeQA-Score
reports)::

    y = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2,   init b1 = max y, b2 = min y, b3 = mean x, b4 = std x / 4

fitted with ``scipy.optimize.curve_fit``; when the fit fails (no convergence, non-finite output,
constant predictions) a straight-line least-squares fit is used instead and ``fit_method`` says so.
Also: the item count, and a seeded bootstrap 95% confidence interval for SRCC.

Direction: every number is reported so that HIGHER = BETTER AGREEMENT. When exactly one of the two
sides is lower-is-better (DMOS labels such as LIVE or CSIQ, or a model such as BRISQUE/NIQE/PIQE
whose score falls as quality rises) the predictions are negated (x -> -x) before anything is
computed; when both are lower-is-better nothing is flipped. The logistic fit maps the (possibly
negated) predictions onto the label scale, so RMSE(fit) is always in label units. ``sign`` in the
result records the flip (+1 or -1) so that raw correlations can be recovered.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import optimize, special, stats

from .data.labels import LabelRecord, LabelSet

__all__ = [
    "EvalResult", "evaluate", "metrics", "logistic4", "fit_logistic4", "bootstrap_srcc_ci",
    "comparison_table", "write_report", "align",
]


# --------------------------------------------------------------------------------------------
# the logistic


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """VQEG 4-parameter logistic; ``expit`` keeps it free of overflow warnings."""
    return (b1 - b2) * special.expit((np.asarray(x, dtype=np.float64) - b3) / abs(b4)) + b2


@dataclass
class Fit:
    method: str  # "logistic4" or "linear" (fallback)
    params: tuple[float, ...]
    note: str = ""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.method == "logistic4":
            return logistic4(x, *self.params)
        a, b = self.params
        return a * x + b


def fit_logistic4(x: Sequence[float], y: Sequence[float], *, maxfev: int = 20000) -> Fit:
    """Fit the VQEG logistic (init as in DeQA-Score); fall back to a line when that fails."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sx = float(np.std(x))
    if x.size < 5 or sx == 0.0 or not np.isfinite(sx):
        return _linear(x, y, "too few items or constant predictions")
    p0 = [float(np.max(y)), float(np.min(y)), float(np.mean(x)), sx / 4.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(logistic4, x, y, p0=p0, maxfev=maxfev)
    except (RuntimeError, ValueError, optimize.OptimizeWarning, FloatingPointError) as e:
        return _linear(x, y, f"logistic fit failed ({type(e).__name__}: {e})")
    fitted = logistic4(x, *params)
    if not np.all(np.isfinite(params)) or not np.all(np.isfinite(fitted)) or params[3] == 0:
        return _linear(x, y, "logistic fit gave non-finite values")
    return Fit("logistic4", tuple(float(p) for p in params))


def _linear(x: np.ndarray, y: np.ndarray, why: str) -> Fit:
    if x.size >= 2 and np.std(x) > 0:
        a, b = np.polyfit(x, y, 1)
    else:
        a, b = 0.0, float(np.mean(y)) if y.size else 0.0
    return Fit("linear", (float(a), float(b)), note=why)


# --------------------------------------------------------------------------------------------
# metrics


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(stats.pearsonr(a, b)[0])


def metrics(pred: Sequence[float], human: Sequence[float]) -> dict[str, Any]:
    """SRCC, KRCC, PLCC (raw), PLCC / RMSE after the logistic fit, for aligned arrays.

    No direction handling here: pass predictions already oriented like the labels.
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(human, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"pred and human differ in shape: {x.shape} vs {y.shape}")
    n = int(x.size)
    out: dict[str, Any] = {"n": n}
    if n < 2:
        out.update(srcc=math.nan, krcc=math.nan, plcc=math.nan, plcc_fit=math.nan, rmse_fit=math.nan,
                   fit=_linear(x, y, "fewer than 2 items"))
        return out
    const = np.std(x) == 0 or np.std(y) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input warnings: the nan says it
        out["srcc"] = math.nan if const else float(stats.spearmanr(x, y)[0])
        out["krcc"] = math.nan if const else float(stats.kendalltau(x, y)[0])
    out["plcc"] = _pearson(x, y)
    fit = fit_logistic4(x, y)
    fitted = fit(x)
    out["plcc_fit"] = _pearson(fitted, y)
    out["rmse_fit"] = float(np.sqrt(np.mean((fitted - y) ** 2)))
    out["fit"] = fit
    return out


def bootstrap_srcc_ci(pred: Sequence[float], human: Sequence[float], *, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0, chunk: int = 100) -> tuple[float, float]:
    """Percentile bootstrap CI of SRCC: resample items with replacement ``n_boot`` times (seeded)."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(human, dtype=np.float64)
    n = x.size
    if n < 3 or n_boot < 1:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values: list[np.ndarray] = []
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        rx = stats.rankdata(x[idx], axis=1)
        ry = stats.rankdata(y[idx], axis=1)
        rx -= rx.mean(axis=1, keepdims=True)
        ry -= ry.mean(axis=1, keepdims=True)
        den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            values.append((rx * ry).sum(axis=1) / den)
    v = np.concatenate(values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------------------------
# evaluate


@dataclass
class EvalResult:
    """All numbers for one model on one label set (higher = better agreement, see module doc)."""

    name: str
    n: int
    srcc: float
    krcc: float
    plcc: float
    plcc_fit: float
    rmse_fit: float
    srcc_ci: tuple[float, float]
    ci_level: float = 0.95
    n_boot: int = 1000
    fit_method: str = "logistic4"
    fit_params: tuple[float, ...] = ()
    fit_note: str = ""
    sign: int = 1  # -1: predictions were negated before computing (direction mismatch)
    labels_lower_is_better: bool = False
    model_lower_is_better: bool = False
    dataset: str | None = None
    n_missing: int = 0  # labelled items without a (finite) prediction
    n_unlabelled: int = 0  # predictions whose key matched no label
    missing: list[str] = field(default_factory=list)
    # aligned data (not in to_dict): item keys, the predictions as given, the human scores
    paths: list[str] = field(default_factory=list, repr=False)
    pred: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    human: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("paths", "pred", "human"):
            d.pop(k)
        d["srcc_ci"] = list(self.srcc_ci)
        d["fit_params"] = list(self.fit_params)
        d["missing"] = self.missing[:100]
        return {k: _json_safe(v) for k, v in d.items()}

    def fitted(self, x: np.ndarray | None = None) -> np.ndarray:
        """The fitted curve at oriented predictions ``x`` (default: this result's items)."""
        fit = Fit(self.fit_method, tuple(self.fit_params))
        return fit(self.sign * self.pred if x is None else x)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    return v


def align(predictions: Mapping[str, float], records: Iterable[LabelRecord]) -> tuple[list[str], np.ndarray, np.ndarray, list[str], int]:
    """Pair predictions with records by path: exact key first; when no key matches exactly, by
    file name (only when file names are unique on both sides). Returns (paths, pred, human,
    missing record paths, number of unused predictions)."""
    recs = list(records)
    preds = {str(k): v for k, v in predictions.items()}
    keyed = {r.path: r for r in recs}
    if len(keyed) != len(recs):
        dup = len(recs) - len(keyed)
        raise ValueError(f"{dup} duplicate path(s) in the labels; predictions are keyed by path")
    lookup: dict[str, str] = {}  # record path -> prediction key
    exact = [p for p in keyed if p in preds]
    if exact:
        lookup = {p: p for p in exact}
    else:
        rec_names = [os.path.basename(p) for p in keyed]
        pred_names = {os.path.basename(k): k for k in preds}
        if len(set(rec_names)) == len(rec_names) and len(pred_names) == len(preds):
            lookup = {p: pred_names[os.path.basename(p)] for p in keyed if os.path.basename(p) in pred_names}
    paths, x, y, missing = [], [], [], []
    used = set()
    for r in recs:
        k = lookup.get(r.path)
        v = preds.get(k) if k is not None else None
        if v is None or not math.isfinite(float(v)):
            missing.append(r.path)
            continue
        used.add(k)
        paths.append(r.path)
        x.append(float(v))
        y.append(float(r.score))
    return paths, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), missing, len(preds) - len(used)


def evaluate(predictions: Mapping[str, float], records: LabelSet | Iterable[LabelRecord], *, name: str = "model",
             labels_lower_is_better: bool | None = None, model_lower_is_better: bool = False,
             n_boot: int = 1000, ci_level: float = 0.95, seed: int = 0) -> EvalResult:
    """Score ``predictions`` (path -> score) against human labels.

    ``labels_lower_is_better``: taken from a :class:`LabelSet` when None (False for a plain list).
    ``model_lower_is_better``: True for BRISQUE / NIQE / PIQE style scores.
    """
    dataset = None
    if isinstance(records, LabelSet):
        if labels_lower_is_better is None:
            labels_lower_is_better = records.lower_is_better
        dataset = records.name
        records = records.records
    labels_lower_is_better = bool(labels_lower_is_better)
    paths, pred, human, missing, unused = align(predictions, records)
    sign = -1 if labels_lower_is_better != bool(model_lower_is_better) else 1
    x = sign * pred
    m = metrics(x, human)
    ci = bootstrap_srcc_ci(x, human, n_boot=n_boot, level=ci_level, seed=seed) if m["n"] >= 3 else (math.nan, math.nan)
    fit: Fit = m["fit"]
    return EvalResult(
        name=name, n=m["n"], srcc=m["srcc"], krcc=m["krcc"], plcc=m["plcc"], plcc_fit=m["plcc_fit"],
        rmse_fit=m["rmse_fit"], srcc_ci=ci, ci_level=ci_level, n_boot=n_boot, fit_method=fit.method,
        fit_params=fit.params, fit_note=fit.note, sign=sign, labels_lower_is_better=labels_lower_is_better,
        model_lower_is_better=bool(model_lower_is_better), dataset=dataset, n_missing=len(missing),
        n_unlabelled=unused, missing=missing, paths=paths, pred=pred, human=human,
    )


# --------------------------------------------------------------------------------------------
# reporting


def _f(v: float, digits: int = 4) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def comparison_table(results: Sequence[EvalResult] | EvalResult) -> str:
    """A Markdown table, one row per model: n, SRCC [CI], KRCC, PLCC, PLCC(fit), RMSE(fit)."""
    if isinstance(results, EvalResult):
        results = [results]
    level = results[0].ci_level if results else 0.95
    head = ["model", "n", f"SRCC [{int(round(level * 100))}% CI]", "KRCC", "PLCC", "PLCC(fit)", "RMSE(fit)"]
    rows = []
    for r in results:
        ci = f"[{_f(r.srcc_ci[0], 3)}, {_f(r.srcc_ci[1], 3)}]"
        fit_mark = "" if r.fit_method == "logistic4" else " (linear)"
        rows.append([r.name, str(r.n), f"{_f(r.srcc)} {ci}", _f(r.krcc), _f(r.plcc), _f(r.plcc_fit) + fit_mark,
                     _f(r.rmse_fit)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    notes = []
    if any(r.sign < 0 for r in results):
        notes.append("predictions negated where exactly one of labels/model is lower-is-better, "
                     "so higher = better agreement everywhere")
    if any(r.n_missing for r in results):
        notes.append("items without a prediction: " + ", ".join(f"{r.name} {r.n_missing}" for r in results if r.n_missing))
    return "\n".join(out + [f"\n{n}" for n in notes])


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return s or "model"


def write_report(out_dir: str | os.PathLike, results: Sequence[EvalResult] | EvalResult,
                 per_item: Mapping[str, Mapping[str, Any]] | None = None,
                 level_probs: Mapping[str, Any] | None = None, *, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``per_item.csv``, ``table.md`` and PNG plots into ``out_dir``.

    ``per_item``: optional extra per-item columns, ``{path: {column: value}}`` (e.g. split, level).
    ``level_probs``: optional five level probabilities (bad..excellent) per item, either
    ``{model_name: {path: probs}}`` or, for a single model, ``{path: probs}``; each model gets a
    level-probability histogram. Plots need matplotlib (imported lazily, Agg backend); without it
    the files other than PNGs are still written and ``plots_skipped`` is recorded in results.json.
    Returns the written paths by role.
    """
    if isinstance(results, EvalResult):
        results = [results]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    # per-item CSV: union of items, human score, each model's raw prediction and fitted value
    items: dict[str, float] = {}
    for r in results:
        for p, h in zip(r.paths, r.human):
            items.setdefault(p, float(h))
    extra_cols: list[str] = []
    if per_item:
        for cols in per_item.values():
            for c in cols:
                if c not in extra_cols:
                    extra_cols.append(c)
    model_maps = []
    for r in results:
        fitted = r.fitted() if r.n else np.zeros(0)
        model_maps.append((dict(zip(r.paths, r.pred)), dict(zip(r.paths, fitted))))
    header = ["path", "human"]
    for r in results:
        header += [f"{r.name}", f"{r.name}_fit"]
    header += extra_cols
    csv_path = out / "per_item.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for p, h in items.items():
            row: list[Any] = [p, repr(h)]
            for raw, fit in model_maps:
                row += [repr(float(raw[p])) if p in raw else "", repr(float(fit[p])) if p in fit else ""]
            ex = per_item.get(p, {}) if per_item else {}
            row += [ex.get(c, "") for c in extra_cols]
            w.writerow(row)
    written["per_item"] = csv_path

    table_path = out / "table.md"
    table_path.write_text(comparison_table(list(results)) + "\n", encoding="utf-8")
    written["table"] = table_path

    plot_paths: dict[str, Path] = {}
    plots_skipped = None
    if plots:
        try:
            plot_paths = _plots(out, list(results), _per_model_probs(level_probs, list(results)))
        except ImportError as e:
            plots_skipped = f"matplotlib not available ({e}); install qalign[plot]"
    written.update(plot_paths)

    doc = {
        "results": [r.to_dict() for r in results],
        "direction": "higher = better agreement; predictions negated (sign = -1) when exactly one of "
                     "labels/model is lower-is-better",
        "plcc": "plcc = raw Pearson (Q-Align/pyiqa); plcc_fit / rmse_fit after the VQEG 4-parameter logistic "
                "(DeQA-Score)",
        "files": {k: v.name for k, v in written.items()},
    }
    if plots_skipped:
        doc["plots_skipped"] = plots_skipped
    json_path = out / "results.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    written["results"] = json_path
    return written


def _per_model_probs(level_probs: Mapping[str, Any] | None, results: list[EvalResult]) -> dict[str, np.ndarray]:
    if not level_probs:
        return {}
    names = {r.name for r in results}
    if set(level_probs) and set(level_probs) <= names and all(isinstance(v, Mapping) for v in level_probs.values()):
        groups = dict(level_probs)
    else:
        groups = {results[0].name if results else "model": level_probs}
    out = {}
    for name, probs in groups.items():
        arr = np.asarray([np.asarray(v, dtype=np.float64) for v in probs.values()])
        if arr.ndim != 2 or arr.shape[1] != 5:
            raise ValueError(f"level_probs for {name!r}: need five probabilities per item, got shape {arr.shape}")
        out[name] = arr
    return out


def _plots(out: Path, results: list[EvalResult], probs: dict[str, np.ndarray]) -> dict[str, Path]:
    # Figure + the Agg canvas directly: no pyplot, so no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .levels import LEVELS

    paths: dict[str, Path] = {}
    for r in results:
        if r.n < 2:
            continue
        x = r.sign * r.pred
        fig = Figure(figsize=(5.5, 4.5), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.scatter(x, r.human, s=8, alpha=0.5, color="tab:blue", edgecolors="none", label="items")
        grid = np.linspace(float(np.min(x)), float(np.max(x)), 200)
        ax.plot(grid, r.fitted(grid), color="tab:red", lw=2,
                label="logistic fit" if r.fit_method == "logistic4" else "linear fit (logistic failed)")
        ax.set_xlabel("prediction" + (" (negated)" if r.sign < 0 else ""))
        ax.set_ylabel("human score" + (" (lower is better)" if r.labels_lower_is_better else ""))
        ax.set_title(f"{r.name}: SRCC {_f(r.srcc, 3)}  PLCC {_f(r.plcc, 3)}  n={r.n}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        p = out / f"scatter_{_safe_name(r.name)}.png"
        fig.savefig(p)
        paths[f"scatter:{r.name}"] = p
    for name, arr in probs.items():
        fig = Figure(figsize=(9, 3.8), dpi=110)
        FigureCanvasAgg(fig)
        a1, a2 = fig.subplots(1, 2)
        top = np.bincount(arr.argmax(axis=1), minlength=5)
        a1.bar(range(5), top, color="tab:blue")
        a1.set_xticks(range(5), list(LEVELS))
        a1.set_title("most probable level (count)", fontsize=10)
        a2.boxplot([arr[:, i] for i in range(5)], positions=list(range(5)), showfliers=False)
        a2.plot(range(5), arr.mean(axis=0), "o-", color="tab:red", label="mean")
        a2.set_xticks(range(5), list(LEVELS))
        a2.set_ylim(0, 1)
        a2.set_title("level probabilities", fontsize=10)
        a2.legend(fontsize=8)
        fig.suptitle(f"{name}: level probabilities, n={arr.shape[0]}", fontsize=10)
        fig.tight_layout()
        p = out / f"levels_{_safe_name(name)}.png"
        fig.savefig(p)
        paths[f"levels:{name}"] = p
    return paths
