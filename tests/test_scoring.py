"""The Scorer on the tiny random qalign-tiny folder: batching, order, errors, ranges."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_model import make_image, write_images
from qalign.levels import LEVELS
from qalign.models.base import Backend, ModelInfo, UnsupportedTask
from qalign.scoring import PROB_FIELDS, ROW_FIELDS, ScoreRow, Scorer, expand_inputs

ATOL = 1e-5


def _scores(rows):
    return np.array([r.score for r in rows])


def _probs(rows):
    return np.array([r.probs for r in rows])


@pytest.fixture(scope="module")
def solo(tiny_scorer, image_paths):
    """Each of the 16 images scored alone (batch of 1)."""
    return [tiny_scorer.score(p, batch_size=1)[0] for p in image_paths]


def test_random_tiny_model_is_loud(solo):
    """Different images must get visibly different scores, or the other tests prove nothing."""
    scores = _scores(solo)
    assert scores.max() - scores.min() > 0.1
    assert len(np.unique(np.round(scores, 3))) >= 12


def test_load_gives_the_folder_backend(tiny_scorer, tiny_model_dir):
    from qalign.models.tiny.backend import TinyBackend

    assert isinstance(tiny_scorer.backend, TinyBackend)
    assert tiny_scorer.info.name == str(tiny_model_dir)
    assert tiny_scorer.backend.image_size == 64
    assert tiny_scorer.backend.dtype == torch.float32


def test_loaded_weights_equal_the_saved_ones(tiny_scorer):
    """from_pretrained must load every saved weight (none re-initialised), lm_head tied."""
    from tiny_model import build_config, build_model, build_tokenizer

    reference = build_model(build_config(len(build_tokenizer())))
    loaded = tiny_scorer.backend.model.state_dict()
    ref = reference.state_dict()
    assert set(ref) == set(loaded)
    for key, value in ref.items():
        assert torch.equal(value, loaded[key]), key
    lm = tiny_scorer.backend.model.language_model
    assert torch.equal(lm.get_output_embeddings().weight, lm.get_input_embeddings().weight)


def test_batch_of_16_equals_batches_of_1(tiny_scorer, image_paths, solo):
    batched = tiny_scorer.score(image_paths, batch_size=16)
    assert [r.path for r in batched] == image_paths
    np.testing.assert_allclose(_scores(batched), _scores(solo), atol=ATOL, rtol=0)
    np.testing.assert_allclose(_probs(batched), _probs(solo), atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch_size", [3, 5])
def test_odd_batch_sizes_agree(tiny_scorer, image_paths, solo, batch_size):
    rows = tiny_scorer.score(image_paths, batch_size=batch_size)
    np.testing.assert_allclose(_scores(rows), _scores(solo), atol=ATOL, rtol=0)


def test_rows_follow_input_order(tiny_scorer, image_paths, solo):
    order = [7, 2, 15, 0, 11, 3, 9, 14, 1, 8, 5, 12, 4, 10, 6, 13]
    rows = tiny_scorer.score([image_paths[i] for i in order], batch_size=6)
    assert [r.path for r in rows] == [image_paths[i] for i in order]
    np.testing.assert_allclose(_scores(rows), _scores(solo)[order], atol=ATOL, rtol=0)


def test_single_threaded_preparation_agrees(tiny_model_dir, image_paths, solo):
    import qalign

    scorer = qalign.load(str(tiny_model_dir), device="cpu", batch_size=5, workers=1)
    np.testing.assert_allclose(_scores(scorer.score(image_paths[:7])), _scores(solo[:7]), atol=ATOL, rtol=0)


def test_scores_are_expectations_in_range(solo):
    for row in solo:
        assert row.ok and row.error == ""
        assert 1.0 <= row.score <= 5.0
        probs = np.array(row.probs)
        assert probs.shape == (5,) and (probs > 0).all()
        assert probs.sum() == pytest.approx(1.0, abs=1e-9)
        assert row.score == pytest.approx(float(probs @ np.arange(1, 6)), abs=1e-9)
        assert row.score_0_1 == pytest.approx((row.score - 1.0) / 4.0, abs=1e-12)
        assert 0.0 <= row.score_0_1 <= 1.0
        assert row.level == LEVELS[int(np.argmax(probs))]
        assert row.kind == "image" and row.frames == 1


def test_scores_follow_the_level_logits(tiny_scorer, image_paths):
    """The row's probabilities are the softmax of the backend's five level logits, bad..excellent."""
    backend = tiny_scorer.backend
    from qalign.media.image import load_image

    pixels = backend.preprocess(load_image(image_paths[3]))[None]
    logits = backend.level_logits([pixels]).numpy()[0].astype(np.float64)
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    row = tiny_scorer.score(image_paths[3])[0]
    np.testing.assert_allclose(row.probs, expected, atol=1e-6)


def test_bad_file_in_the_middle_of_a_batch(tiny_scorer, image_paths, solo, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    inputs = image_paths[:5] + [str(broken)] + image_paths[5:9] + [str(missing)] + image_paths[9:12]
    rows = tiny_scorer.score(inputs, batch_size=16)
    assert [r.path for r in rows] == inputs
    bad = {i for i, r in enumerate(rows) if not r.ok}
    assert bad == {5, 10}
    assert str(broken) in rows[5].error and "not a recognised image format" in rows[5].error
    assert str(missing) in rows[10].error and "no such file" in rows[10].error
    for i in bad:
        assert rows[i].score is None and rows[i].probs is None and rows[i].score_0_1 is None
        d = rows[i].as_dict()
        assert d["score_1_5"] is None and all(d[f] is None for f in PROB_FIELDS)
    good = [r for r in rows if r.ok]
    np.testing.assert_allclose(_scores(good), _scores(solo[:12]), atol=ATOL, rtol=0)


def test_pil_images_and_paths_mixed(tiny_scorer, image_paths, solo):
    images = [Image.open(p).convert("RGB") for p in image_paths[:4]]
    inputs = [image_paths[0], images[1], Path(image_paths[2]), images[3]]
    rows = tiny_scorer.score(inputs, batch_size=4)
    assert [r.path for r in rows] == [image_paths[0], "<image 1>", image_paths[2], "<image 3>"]
    np.testing.assert_allclose(_scores(rows), _scores(solo[:4]), atol=ATOL, rtol=0)


def test_single_inputs(tiny_scorer, image_paths, solo):
    one = tiny_scorer.score(image_paths[5])
    assert len(one) == 1 and one[0].score == pytest.approx(solo[5].score, abs=ATOL)
    pil = tiny_scorer.score(make_image(5))
    assert len(pil) == 1 and pil[0].score == pytest.approx(solo[5].score, abs=ATOL)
    assert tiny_scorer.score([]) == []


def test_iter_score_streams_rows(tiny_scorer, image_paths):
    it = tiny_scorer.iter_score(image_paths[:6], batch_size=2)
    first = next(it)
    assert first.path == image_paths[0]
    assert [r.path for r in it] == image_paths[1:6]


def test_as_dict_columns(solo):
    d = solo[0].as_dict()
    assert tuple(d) == ROW_FIELDS
    assert ROW_FIELDS == ("path", "score_1_5", "score_0_1", "p_bad", "p_poor", "p_fair", "p_good", "p_excellent",
                          "error")
    assert d["score_0_1"] == pytest.approx((d["score_1_5"] - 1) / 4)
    assert [d[f] for f in PROB_FIELDS] == list(solo[0].probs)


# ----------------------------------------------------------------- tasks


def test_aesthetics_refused_with_pointer_to_official_checkpoints(tiny_scorer, image_paths):
    from qalign.models.registry import known
    from qalign.models.tiny.backend import INFO, TinyBackend

    assert INFO.tasks == ("quality",)
    for backend in (tiny_scorer.backend, TinyBackend(tiny_scorer.backend.model, tiny_scorer.backend.prompter.tokenizer)):
        with pytest.raises(UnsupportedTask) as info:
            tiny_scorer.__class__(backend).score(image_paths[:2], task="aesthetics")
        message = str(info.value)
        assert "aesthetics" in message and "official checkpoint" in message
        # The models it recommends must be real names of the registry.
        suggested = re.findall(r"--model ([\w.-]+)", message)
        assert suggested, message
        names = known()
        for name in suggested:
            assert name in names and "aesthetics" in names[name].tasks, name
    assert TinyBackend(tiny_scorer.backend.model, tiny_scorer.backend.prompter.tokenizer).info is INFO


def test_unknown_task_is_a_value_error(tiny_scorer, image_paths):
    with pytest.raises(ValueError, match="unknown task"):
        tiny_scorer.score(image_paths[:1], task="sharpness")


# ----------------------------------------------------------------- a failing backend


class _FlakyBackend(Backend):
    """Logit = mean pixel; the model 'crashes' on any batch holding an all-zero image."""

    info = ModelInfo(name="flaky")

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def level_logits(self, items, task="quality", input_kind="image"):
        means = [float(x.mean()) for x in items]
        if any(m == 0.0 for m in means):
            raise RuntimeError("boom")
        return torch.tensor([[0, 0, 0, 0, 10 * m] for m in means], dtype=torch.float32)


def test_a_model_failure_only_fails_its_own_item():
    images = [Image.new("RGB", (4, 4), (v, v, v)) for v in (50, 0, 200, 120)]
    rows = Scorer(_FlakyBackend(), batch_size=4).score(images)
    assert [r.ok for r in rows] == [True, False, True, True]
    assert "model failed" in rows[1].error and "boom" in rows[1].error
    alone = [Scorer(_FlakyBackend(), batch_size=1).score(images[i])[0].score for i in (0, 2, 3)]
    assert [rows[i].score for i in (0, 2, 3)] == pytest.approx(alone)
    assert rows[2].score > rows[3].score > rows[0].score  # brighter -> more "excellent"


# ----------------------------------------------------------------- expand_inputs


@pytest.fixture()
def tree(tmp_path):
    write_images(tmp_path / "top", 3, fmt="png")
    write_images(tmp_path / "top" / "sub", 2, start=10, fmt="jpg")
    (tmp_path / "top" / "notes.txt").write_text("x")
    (tmp_path / "top" / "UPPER.JPG").write_bytes((tmp_path / "top" / "sub" / "img_010.jpg").read_bytes())
    return tmp_path


def test_expand_folder(tree):
    top = tree / "top"
    got = expand_inputs([str(top)])
    assert got == sorted(str(p) for p in (top / "img_000.png", top / "img_001.png", top / "img_002.png",
                                          top / "UPPER.JPG"))


def test_expand_folder_recursive(tree):
    top = tree / "top"
    got = expand_inputs([str(top)], recursive=True)
    assert set(got) == set(expand_inputs([str(top)])) | {str(top / "sub" / "img_010.jpg"),
                                                           str(top / "sub" / "img_011.jpg")}
    assert len(got) == len(set(got)) == 6
    assert not any(p.endswith(".txt") for p in got)


def test_expand_globs(tree):
    top = tree / "top"
    assert expand_inputs([str(top / "*.png")]) == [str(top / f"img_00{i}.png") for i in range(3)]
    assert expand_inputs([str(top / "img_00[12].png")]) == [str(top / "img_001.png"), str(top / "img_002.png")]
    assert expand_inputs([str(top / "**" / "*.jpg")], recursive=True) == [
        str(top / "sub" / "img_010.jpg"), str(top / "sub" / "img_011.jpg")]
    assert expand_inputs([str(top / "*.nothing")]) == []


def test_expand_keeps_missing_and_explicit_files_and_dedupes(tree):
    top = tree / "top"
    missing = str(tree / "does-not-exist.png")
    notes = str(top / "notes.txt")
    got = expand_inputs([missing, notes, str(top), str(top / "img_000.png")])
    assert got[0] == missing and got[1] == notes  # kept, in the order given
    assert got.count(str(top / "img_000.png")) == 1
    assert len(got) == 2 + 4


def test_scoring_an_expanded_folder_reports_the_missing_path(tiny_scorer, tree):
    top = tree / "top"
    missing = str(tree / "gone.png")
    rows = tiny_scorer.score(expand_inputs([str(top), missing]))
    assert [r.path for r in rows][-1] == missing
    assert [r.ok for r in rows] == [True] * 4 + [False]


def test_row_defaults():
    row = ScoreRow("x", error="x: broken")
    assert not row.ok and row.level is None and row.score_0_1 is None
