"""`qalign train` on the tiny random qalign-tiny folder (no real bases): end to end from a labels
CSV through `qalign data convert`, training and `qalign score`; soft labels; LoRA / abstractor-only
/ full-LLM outputs; a mixture of datasets; kill and resume; argument errors.

The synthetic corpus: smooth gradients (half of them with stripes) whose distortion strength
0..4 darkens them, adds noise and (every third image) blurs them; the score falls with the
strength. Untrained, the random model ranks them backwards; trained, it ranks them right.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from processes import console_script, run_until_then_sigkill
from qalign.cli import main

N_IMAGES = 200


def write_corpus(root: Path, n: int = N_IMAGES) -> Path:
    """``root/images/img_XXX.png`` + ``root/labels.csv`` (path, score on 0-100, split: every 4th test)."""
    from PIL import Image, ImageFilter

    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        strength = i % 5
        x = np.linspace(0, 1, 64)[None, :, None]
        y = np.linspace(0, 1, 64)[:, None, None]
        arr = rng.uniform(120, 220, 3) + rng.uniform(-60, 60, 3) * x + rng.uniform(-60, 60, 3) * y
        if i % 2:
            arr = arr + 30 * (((np.arange(64)[None, :, None] // (3 + i % 6)) % 2) - 0.5)
        arr = arr * (1 - 0.16 * strength) + rng.normal(0, 6 * strength, arr.shape)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if strength and i % 3 == 0:
            image = image.filter(ImageFilter.GaussianBlur(0.5 * strength))
        image.save(root / "images" / f"img_{i:03d}.png")
        rows.append((f"images/img_{i:03d}.png", f"{90 - 18 * strength + rng.normal(0, 2):.2f}",
                     "test" if i % 4 == 3 else "train"))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "split"])
        w.writerows(rows)
    return labels


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("train-corpus"))


def _rows(labels: Path, split: str | None = None) -> list[dict]:
    rows = list(csv.DictReader(open(labels)))
    return [r for r in rows if split is None or r["split"] == split]


def _train(*args) -> int:
    return main(["train", "--mixed-precision", "no", "--log-every", "1000", *map(str, args)])


def _score_srcc(capsys, model, labels: Path, split: str = "test") -> float:
    """SRCC of ``qalign score --model MODEL`` on the split's images against their labels."""
    rows = _rows(labels, split)
    paths = [str(labels.parent / r["path"]) for r in rows]
    capsys.readouterr()
    assert main(["score", *paths, "--model", str(model), "--device", "cpu", "--format", "jsonl"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_path = {Path(r["path"]).name: r["score_1_5"] for r in out}
    pred = [by_path[Path(p).name] for p in paths]
    assert all(np.isfinite(pred)) and np.std(pred) > 0
    return float(stats.spearmanr(pred, [float(r["score"]) for r in rows])[0])


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --------------------------------------------------------------------------------------------- end to end

def test_end_to_end_convert_train_score_beats_untrained(capsys, tmp_path, corpus, tiny_model_dir):
    """labels CSV -> `qalign data convert` -> `qalign train --lora` -> `qalign score --model OUT`:
    the trained model ranks the held-out images far better than the untrained one, and the SRCC
    that training recorded for its last epoch is what the saved model scores."""
    records = tmp_path / "train.jsonl"
    assert main(["data", "convert", "--data", str(corpus), "--output", str(records)]) == 0
    assert len(records.read_text().splitlines()) == N_IMAGES
    untrained = _score_srcc(capsys, tiny_model_dir, corpus)

    out = tmp_path / "model"
    t0 = time.time()
    assert _train("--data", records, "--lora", "--model", tiny_model_dir, "--output", out, "--epochs", 20,
                  "--batch-size", 8, "--lr", 2e-3, "--seed", 0) == 0
    took = time.time() - t0
    doc = json.loads((out / "training.json").read_text())
    assert doc["steps"] == 20 * 19 and doc["steps_per_epoch"] == 19  # 150 train items / 8
    assert doc["train_items"] == 150 and doc["eval_items"] == 50 and doc["saved_as"] == "model.safetensors"
    assert len(doc["history"]) == 20 and [h["step"] for h in doc["history"]][:2] == [19, 38]
    assert len(doc["train_images"]) == 150
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "trained.safetensors").exists()

    trained = _score_srcc(capsys, out, corpus)
    print(f"held-out SRCC untrained {untrained:.3f} -> trained {trained:.3f} ({took:.0f}s training)")
    assert trained > 0.6, (untrained, trained)
    assert trained > untrained + 0.3, (untrained, trained)
    # The saved model (LoRA merged, pixels through the full vision path) is the model that was
    # evaluated during training (cached float16 features): same ranking quality.
    assert trained == pytest.approx(doc["history"][-1]["srcc"], abs=0.03)


# --------------------------------------------------------------------------------------------- losses

def _batch(tiny_model_dir: Path, corpus: Path, n: int = 6):
    """The tiny model (LoRA added), its prompter and cached features of ``n`` corpus images."""
    import contextlib

    from qalign.models.tiny.backend import TinyPrompter, preprocess_image
    from qalign.train import Record, TrainConfig, add_lora, build_tiny, compute_features, make_targets

    cfg = TrainConfig(data=str(corpus), output="unused", model=str(tiny_model_dir))
    model, config, tokenizer, start = build_tiny(cfg)
    assert start.kind == "full"
    rows = _rows(corpus)[:n]
    records = [Record(str(corpus.parent / r["path"]), float(r["score"]), 10.0, "train") for r in rows]
    feats = compute_features(model, lambda im: preprocess_image(im, config.image_size), records, 8,
                             contextlib.nullcontext, "features")
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, cfg)
    for p in model.visual_abstractor.parameters():
        p.requires_grad_(True)
    levels, soft, _ = make_targets(records, False)
    return model, TinyPrompter(tokenizer), feats, levels, soft, cfg


def test_soft_labels_loss_is_finite_and_its_gradients_differ_from_one_hot(tiny_model_dir, corpus):
    import random

    import torch

    from qalign.train import batch_loss

    model, prompter, feats, levels, soft, cfg = _batch(tiny_model_dir, corpus)
    assert len(set(levels)) > 2
    for s, lvl in zip(soft, levels):
        assert s.sum() == pytest.approx(1.0) and abs(int(np.argmax(s)) - lvl) <= 1
    # spread-out labels, not one-hot (only the dataset's extreme scores pile up on one end level)
    assert sum(s.max() < 0.95 for s in soft) >= len(soft) - 2
    grads, losses = {}, {}
    for mode in ("one-hot", "soft"):
        cfg.soft_labels = mode == "soft"
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        model.eval()  # no dropout: the two losses see the same network
        loss = batch_loss(model, prompter, feats, levels, soft, cfg, random.Random(0))
        loss.backward()
        losses[mode] = float(loss.detach())
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert all(np.isfinite(v) and v > 0 for v in losses.values()), losses
    assert grads["soft"].shape == grads["one-hot"].shape and torch.isfinite(grads["soft"]).all()
    cos = torch.nn.functional.cosine_similarity(grads["soft"], grads["one-hot"], dim=0)
    assert not torch.allclose(grads["soft"], grads["one-hot"], rtol=1e-3, atol=1e-6)
    assert float(cos) < 0.999, float(cos)


def test_soft_labels_training_runs(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "soft"
    assert _train("--data", corpus, "--model", tiny_model_dir, "--output", out, "--max-steps", 8,
                  "--batch-size", 8, "--lr", 2e-3, "--soft-labels") == 0
    doc = json.loads((out / "training.json").read_text())
    assert doc["config"]["soft_labels"] is True and doc["steps"] == 8
    assert np.isfinite(doc["last_loss"]) and doc["last_loss"] > 0
    assert np.isfinite(doc["history"][-1]["srcc"])
    import qalign

    scores = [r.score for r in qalign.load(str(out), device="cpu").score([str(corpus.parent / "images/img_000.png")])]
    assert 1.0 <= scores[0] <= 5.0


# --------------------------------------------------------------------------------------------- what trains

@pytest.mark.parametrize("mode", ["--lora", "--no-lora", "--full"])
def test_what_trains_is_what_changes_in_the_saved_model(tmp_path, corpus, tiny_model_dir, mode):
    """--lora: q_proj/v_proj change (LoRA merged), k_proj does not; --no-lora: the LLM is the
    base's bit for bit; --full: every LLM weight moves. The abstractor always trains."""
    out = tmp_path / mode.strip("-")
    assert _train("--data", corpus, "--model", tiny_model_dir, "--output", out, "--max-steps", 3,
                  "--batch-size", 8, "--lr", 1e-2, mode) == 0
    base, got = _tensors(tiny_model_dir), _tensors(out)
    assert set(base) == set(got)
    changed = {k for k in base if not np.array_equal(base[k].numpy(), got[k].numpy())}
    layer = "language_model.model.layers.0."
    assert "visual_abstractor.feature_proj.weight" in changed
    assert not any(k.startswith("vision_model.") for k in changed)
    if mode == "--lora":
        assert {layer + "self_attn.q_proj.weight", layer + "self_attn.v_proj.weight"} <= changed
        assert not any(k.startswith("language_model.") and "q_proj" not in k and "v_proj" not in k for k in changed)
    elif mode == "--no-lora":
        assert not any(k.startswith("language_model.") for k in changed)
    else:
        assert {layer + "self_attn.k_proj.weight", layer + "mlp.down_proj.weight",
                "language_model.model.embed_tokens.weight"} <= changed
    doc = json.loads((out / "training.json").read_text())
    assert doc["config"]["full"] is (mode == "--full") and doc["config"]["lora"] is (mode == "--lora")


def test_combine_lora_is_exact(tiny_model_dir):
    """Fine-tuning a trained folder again keeps its earlier LoRA: the stacked factors equal the two
    merges one after the other."""
    import torch

    from qalign.models.tiny.backend import merge_lora
    from qalign.models.tiny.modeling_qalign_tiny import QAlignTinyForConditionalGeneration
    from qalign.train import combine_lora

    def model():
        return QAlignTinyForConditionalGeneration.from_pretrained(tiny_model_dir).eval()

    g = torch.Generator().manual_seed(0)
    q, v = "language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.1.self_attn.v_proj"
    out_q, in_q = model().get_submodule(q).weight.shape
    out_v, in_v = model().get_submodule(v).weight.shape

    def factors(name, out_f, in_f, r, scale):
        return {f"lora.{name}.A": torch.randn(r, in_f, generator=g), f"lora.{name}.B": torch.randn(out_f, r, generator=g),
                f"lora.{name}.scale": torch.tensor(scale)}

    prior = factors(q, out_q, in_q, 4, 2.0)
    new = {**factors(q, out_q, in_q, 2, 0.5), **factors(v, out_v, in_v, 3, 1.5)}
    one, two = model(), model()
    merge_lora(one, prior)
    merge_lora(one, new)
    combined = combine_lora(prior, new)
    assert combined[f"lora.{q}.A"].shape == (6, in_q) and float(combined[f"lora.{q}.scale"]) == 1.0
    merge_lora(two, combined)
    for name in (q, v):
        torch.testing.assert_close(one.get_submodule(name).weight, two.get_submodule(name).weight, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model().get_submodule(q).weight, two.get_submodule(q).weight)


# --------------------------------------------------------------------------------------------- mixtures

def test_each_dataset_is_binned_on_its_own_range():
    from qalign.train import Record, make_targets

    a = [Record(f"a{i}", s, None, "train", 0) for i, s in enumerate([0.0, 25.0, 50.0, 75.0, 100.0])]
    b = [Record(f"b{i}", s, None, "train", 1) for i, s in enumerate([1.0, 2.0, 3.0, 4.0, 5.0])]
    levels, soft, ranges = make_targets(a + b, False)
    assert ranges == {0: (0.0, 100.0), 1: (1.0, 5.0)}
    assert levels == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # on one shared range b would be all "bad"
    assert [int(np.argmax(s)) for s in soft] == levels


def test_epoch_order_follows_the_weights_and_is_reproducible():
    from collections import Counter

    from qalign.train import epoch_order

    groups = [list(range(10)), list(range(10, 14))]
    order = epoch_order(groups, [1.0, 2.0], epoch=0, seed=0)
    assert Counter(order) == Counter({**{i: 1 for i in range(10)}, **{i: 2 for i in range(10, 14)}})
    assert order == epoch_order(groups, [1.0, 2.0], epoch=0, seed=0)
    assert order != epoch_order(groups, [1.0, 2.0], epoch=1, seed=0)
    half = [epoch_order(groups, [0.5, 1.0], epoch=e, seed=0) for e in range(4)]
    assert all(len(o) == 5 + 4 for o in half)
    assert all(sum(1 for i in o if i < 10) == 5 for o in half)
    assert len({tuple(sorted(i for i in o if i < 10)) for o in half}) > 1  # a fresh half each epoch
    # One dataset with weight 1: the order a single-dataset run always had (resumable across versions).
    import random

    legacy = list(range(10))
    random.Random(0 * 7919 + 3).shuffle(legacy)
    assert epoch_order([list(range(10))], [1.0], epoch=3, seed=0) == legacy


def test_mixture_of_two_datasets_with_weights_and_tasks(tmp_path, corpus, tiny_model_dir):
    """Two labels files on different scales (0-100 and 1-5), weights 1,2, a task each: every
    dataset is binned on its own range, sampled by its weight and evaluated on its own."""
    rows = _rows(corpus)
    a, b = tmp_path / "first.csv", tmp_path / "second.csv"
    with open(a, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "split"])
        w.writerows([(str(corpus.parent / r["path"]), r["score"], r["split"]) for r in rows[:100]])
    with open(b, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "split"])
        w.writerows([(str(corpus.parent / r["path"]), f"{1 + 4 * float(r['score']) / 100:.3f}", r["split"])
                     for r in rows[100:160]])
    out = tmp_path / "mix"
    assert _train("--data", a, "--data", b, "--weights", "1,2", "--task", "quality,aesthetics", "--model",
                  tiny_model_dir, "--output", out, "--epochs", 1, "--batch-size", 16) == 0
    doc = json.loads((out / "training.json").read_text())
    assert doc["weights"] == {"first": 1.0, "second": 2.0}
    assert doc["tasks"] == {"first": "quality", "second": "aesthetics"}
    ra, rb = doc["score_ranges"]["first"], doc["score_ranges"]["second"]
    assert ra[1] > 50 and rb[1] < 5.1  # each its own scale
    assert doc["train_items"] == 75 + 45
    assert doc["steps_per_epoch"] == doc["steps"] == -(-(75 + 2 * 45) // 16)
    last = doc["history"][-1]
    assert set(last["datasets"]) == {"first", "second"}
    assert last["datasets"]["first"]["n"] == 25 and last["datasets"]["second"]["n"] == 15
    assert last["srcc"] == pytest.approx(np.mean([m["srcc"] for m in last["datasets"].values()]))


# --------------------------------------------------------------------------------------------- kill + resume

RESUME_ARGS = ("--max-steps", 100, "--batch-size", 2, "--lr", 2e-3, "--save-every", 2, "--seed", 3)


def test_kill_mid_epoch_and_resume_continues_exactly(tmp_path, capsys, corpus, tiny_model_dir):
    """SIGKILL a run once a checkpoint exists; the same command then resumes at the checkpoint's
    step (not zero), finishes at the right step count, and ends with the very weights and eval
    history of an uninterrupted run: step, optimizer, scheduler and data order all restored."""
    killed = tmp_path / "killed"
    args = ["train", "--data", str(corpus), "--model", str(tiny_model_dir), "--output", str(killed),
            "--mixed-precision", "no", *map(str, RESUME_ARGS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    state_file = killed / "checkpoint" / "trainer.json"

    def checkpoint_at_step_4() -> bool:
        try:
            return json.loads(state_file.read_text())["step"] >= 4
        except (OSError, ValueError, KeyError):
            return False

    with open(tmp_path / "killed.log", "w") as log:
        proc = run_until_then_sigkill([*console_script(), *args], checkpoint_at_step_4, 120,
                                      stdout=log, stderr=subprocess.STDOUT, env=env)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed:\n" + \
        (tmp_path / "killed.log").read_text()
    assert not (killed / "training.json").exists() and not (killed / "model.safetensors").exists()
    ckpt = killed / "checkpoint" if (killed / "checkpoint" / "trainer.json").exists() else killed / "checkpoint.old"
    at = json.loads((ckpt / "trainer.json").read_text())["step"]
    steps_per_epoch = 75  # 150 train items / 2
    assert at >= 4 and at % 2 == 0 and at % steps_per_epoch != 0, at  # a --save-every checkpoint, mid-epoch

    capsys.readouterr()
    assert main(args) == 0  # the very same command resumes
    printed = capsys.readouterr().out
    assert f"at step {at}" in printed and "resumed from" in printed, printed
    doc = json.loads((killed / "training.json").read_text())
    assert doc["resumed_at"] == [at] and doc["steps"] == 100
    assert [h["step"] for h in doc["history"]] == [75, 100]  # end of epoch 1, end of training

    straight = tmp_path / "straight"
    assert _train("--data", corpus, "--model", tiny_model_dir, "--output", straight, *RESUME_ARGS) == 0
    ref = json.loads((straight / "training.json").read_text())
    assert ref["resumed_at"] == [] and ref["steps"] == 100
    for h, r in zip(doc["history"], ref["history"]):
        assert h["srcc"] == pytest.approx(r["srcc"], abs=1e-6) and h["plcc"] == pytest.approx(r["plcc"], abs=1e-6)
    got, want = _tensors(killed), _tensors(straight)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    base = _tensors(tiny_model_dir)
    moved = sum(not np.array_equal(base[k].numpy(), want[k].numpy()) for k in want)
    assert moved > 5  # training did change the model

    # A different setting on the same output is refused, not silently mixed in.
    capsys.readouterr()
    assert _train("--data", corpus, "--model", tiny_model_dir, "--output", killed, *RESUME_ARGS[:-2],
                  "--seed", 4) == 2
    assert "other settings" in capsys.readouterr().err


def test_checkpoint_survives_a_kill_during_the_swap(tmp_path, corpus, tiny_model_dir, capsys):
    """A kill between moving the old checkpoint aside and putting the new one in place leaves
    checkpoint.old: the next run resumes from it."""
    out = tmp_path / "swap"
    assert _train("--data", corpus, "--model", tiny_model_dir, "--output", out, "--max-steps", 4,
                  "--batch-size", 8, "--save-every", 2) == 0
    (out / "checkpoint").rename(out / "checkpoint.old")
    (out / "training.json").unlink()
    capsys.readouterr()
    assert _train("--data", corpus, "--model", tiny_model_dir, "--output", out, "--max-steps", 6,
                  "--batch-size", 8, "--save-every", 2) == 0
    assert "at step 4" in capsys.readouterr().out
    doc = json.loads((out / "training.json").read_text())
    assert doc["resumed_at"] == [4] and doc["steps"] == 6
    assert (out / "checkpoint").is_dir() and not (out / "checkpoint.old").exists()


# --------------------------------------------------------------------------------------------- errors

def test_argument_errors_exit_2(tmp_path, capsys, corpus, tiny_model_dir):
    out = tmp_path / "x"
    capsys.readouterr()
    assert _train("--data", corpus, "--model", tmp_path / "missing", "--output", out) == 2
    assert "config.json" in capsys.readouterr().err
    assert _train("--data", corpus, "--data", corpus, "--weights", "1,2,3", "--model", tiny_model_dir,
                  "--output", out) == 2
    assert "--weights" in capsys.readouterr().err
    assert _train("--data", corpus, "--task", "sharpness", "--model", tiny_model_dir, "--output", out) == 2
    assert "--task" in capsys.readouterr().err
    assert _train("--data", corpus, "--train-split", "nope", "--model", tiny_model_dir, "--output", out) == 2
    assert "no records with split 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train("--data", corpus, "--full", "--no-lora", "--model", tiny_model_dir, "--output", out)
