"""ChatVLMBackend on tiny random checkpoints of every chat-VLM family transformers ships.

The checkpoints are built locally (tests/tiny_vlms.py), saved with ``save_pretrained`` and reloaded
through ``load_chat_vlm(dir)`` exactly as a downloaded model would be.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_vlms  # noqa: E402
from PIL import Image  # noqa: E402

from qalign.levels import LEVELS  # noqa: E402
from qalign.models.chat_vlm import (  # noqa: E402
    ChatVLMBackend,
    LevelTokenError,
    ModelNotFound,
    is_chat_vlm_dir,
    level_token_ids,
    load_chat_vlm,
)
from qalign.prompts import answer_prefix, training_questions  # noqa: E402

FAMILIES = list(tiny_vlms.BUILDERS)

# What the decoded prompt must end with: the family's assistant turn start, then the answer prefix.
ASSISTANT_START = {
    "qwen2_vl": "<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_start|>assistant\n",
    "qwen3_vl": "<|im_start|>assistant\n",
    "qwen3_5": "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "llava": "ASSISTANT: ",
    "llava_onevision": "<|im_start|>assistant\n",
    "idefics3": "Assistant: ",
    "smolvlm": "Assistant: ",
    "internvl": "<|im_start|>assistant\n",
}
IMAGE_TOKEN = {
    "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "qwen3_vl": "<|image_pad|>",
    "qwen3_5": "<|image_pad|>", "llava": "<image>", "llava_onevision": "<image>", "idefics3": "<image>",
    "smolvlm": "<image>", "internvl": "<IMG_CONTEXT>",
}
SIZES = [(80, 60), (90, 120), (200, 33), (100, 100)]  # (w, h): different sizes and aspect ratios


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="session")
def images():
    return _images()


@pytest.fixture(scope="session", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    family = request.param
    if family == "smolvlm":
        pytest.importorskip("num2words", reason="transformers' SmolVLM processor needs the num2words package")
    path = tiny_vlms.BUILDERS[family](tmp_path_factory.mktemp(family) / "model")
    return family, path


@pytest.fixture(scope="session")
def backend(family_dir):
    family, path = family_dir
    return family, load_chat_vlm(str(path))


def _items(b: ChatVLMBackend, imgs):
    return [b.preprocess(im)[None] for im in imgs]


# ---------------------------------------------------------------------------------------------


def test_checkpoint_is_detected_as_chat_vlm(family_dir, tmp_path):
    family, path = family_dir
    assert is_chat_vlm_dir(path)
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    (text_only / "config.json").write_text('{"model_type": "llama"}')
    (text_only / "tokenizer_config.json").write_text("{}")
    assert not is_chat_vlm_dir(text_only)
    assert not is_chat_vlm_dir(tmp_path / "missing")


def test_shape_order_and_values_match_full_vocabulary_logits(backend, images):
    family, b = backend
    assert b.info.tasks == ("quality", "aesthetics")
    assert b.info.video == "per-frame"
    out = b.level_logits(_items(b, images))
    assert out.shape == (4, 5) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max() > 1e-6  # the image matters

    # Independent reference: the unsliced model's full-vocabulary logits at the last prompt position,
    # read at the byte-level BPE tokens of " bad" ... " excellent" (what follows "... is").
    ids = b.tokenizer.convert_tokens_to_ids(["\u0120" + w for w in LEVELS])
    assert b.level_ids() == ids
    inputs = b.model_inputs([b.prompt_text()], [images[2]])
    with torch.no_grad():
        full = b.model(**inputs).logits[0, -1]
    assert full.shape[-1] >= len(b.tokenizer)  # really the full vocabulary
    torch.testing.assert_close(out[2], full[ids].float(), atol=1e-5, rtol=1e-5)


def test_batch_of_one_equals_batch_of_four_with_mixed_sizes(backend, images):
    family, b = backend
    items = _items(b, images)
    batch = b.level_logits(items)
    singles = torch.cat([b.level_logits([it]) for it in items])
    assert (batch - singles).abs().max().item() < 1e-5
    # chunked forward passes give the same rows too
    b.max_batch, saved = 3, b.max_batch
    try:
        chunked = b.level_logits(items)
    finally:
        b.max_batch = saved
    assert (batch - chunked).abs().max().item() < 1e-5


def test_padding_does_not_change_a_row(backend, images):
    """Prompts of different lengths in one batch (some rows padded) read each row at its own end."""
    family, b = backend
    short = b.prompt_text()
    q = training_questions("quality", "image")[4]  # "Could you evaluate the quality of this image?"
    long = short.replace("How would you rate the quality of this image?", q + " Please answer in one word.")
    assert long != short
    prompts = [short, long, long, short]
    inputs = b.model_inputs(prompts, images)
    mask = inputs["attention_mask"]
    assert (mask == 0).any(), "the batch must contain padding for this test to mean anything"
    assert (mask[:, 0] == 1).all()  # right padding
    ids = b.level_ids()
    batch = b._forward(prompts, images, "image", ids)
    singles = torch.cat([b._forward([p], [im], "image", ids) for p, im in zip(prompts, images)])
    assert (batch - singles).abs().max().item() < 1e-5


@pytest.mark.parametrize("task,kind", [("quality", "image"), ("aesthetics", "image"), ("quality", "video")])
def test_answer_prefix_follows_the_assistant_turn(backend, images, task, kind):
    family, b = backend
    text = b.prompt_text(task, kind)
    prefix = answer_prefix(task, kind)
    assert text.endswith(ASSISTANT_START[family] + prefix)
    # And in the token ids the model really reads (media expanded by the processor):
    inputs = b.model_inputs([text, b.prompt_text()], images[:2])
    row = inputs["input_ids"][0][: int(inputs["attention_mask"][0].sum())]
    decoded = b.tokenizer.decode(row, skip_special_tokens=False)
    assert decoded.endswith(ASSISTANT_START[family] + prefix)
    assert decoded.count(prefix) == 1
    image_at = decoded.index(IMAGE_TOKEN[family])
    assert image_at < decoded.index(f"rate the {task} of this {kind}?") < decoded.index(ASSISTANT_START[family])


def test_video_is_scored_per_frame_and_averaged(backend, images):
    family, b = backend
    frames = [im.resize((64, 48)) for im in images[:3]]
    video = torch.stack([b.preprocess(f) for f in frames])  # [F, 3, H, W]
    per_frame = b.level_logits([f[None] for f in video])
    out = b.level_logits([video, video[:1]], task="quality", input_kind="video")
    assert out.shape == (2, 5)
    torch.testing.assert_close(out[0], per_frame.mean(dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], per_frame[0], atol=1e-5, rtol=1e-5)


# ----- one family is enough for the rest --------------------------------------------------------


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    path = tiny_vlms.build_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "model")
    return path, load_chat_vlm(str(path))


def test_preprocess_gives_uint8_and_float_input_scores_the_same(qwen, images):
    _, b = qwen
    t = b.preprocess(images[0])
    assert t.dtype == torch.uint8 and t.shape == (3, 60, 80)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(images[0]))
    as_uint8 = b.level_logits([t[None]])
    as_float = b.level_logits([(t.float() / 255.0)[None]])
    as_float255 = b.level_logits([t.float()[None]])  # uint8 values cast to float
    as_pil = b.level_logits([images[0]])
    torch.testing.assert_close(as_uint8, as_float)
    torch.testing.assert_close(as_uint8, as_float255)
    torch.testing.assert_close(as_uint8, as_pil)


def test_tasks_and_native_video_refusals(qwen, images):
    path, b = qwen
    with pytest.raises(ValueError, match="unknown task"):
        b.level_logits(_items(b, images[:1]), task="sharpness")
    only_quality = load_chat_vlm(str(path), tasks=("quality",))
    with pytest.raises(Exception, match="aesthetics"):
        only_quality.level_logits(_items(b, images[:1]), task="aesthetics")
    with pytest.raises(ValueError, match="video processor"):
        load_chat_vlm(str(path), video="native")


def test_level_word_that_is_not_one_token_is_named(tmp_path, images):
    levels_without_excellent = tuple(w for w in LEVELS if w != "excellent")
    path = tiny_vlms.build_qwen2_5_vl(tmp_path / "model", levels=levels_without_excellent)
    b = load_chat_vlm(str(path))
    with pytest.raises(LevelTokenError, match="'excellent'"):
        b.level_logits(_items(b, images[:1]))


def test_level_tokens_follow_how_the_prefix_ends():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    prefix = answer_prefix("quality", "image")
    # Byte-level BPE (Qwen, GPT-2, SmolLM): both "good" and " good" exist; " good" is what follows "is".
    bpe = tiny_vlms.make_tokenizer([])
    assert len(bpe.encode("good", add_special_tokens=False)) == 1
    ids = level_token_ids(bpe, prefix)
    assert bpe.convert_ids_to_tokens(ids) == ["\u0120" + w for w in LEVELS]

    # SentencePiece-style (LLaMA): the space is folded into "\u2581good".
    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.train_from_iterator(tiny_vlms._corpus(LEVELS), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    ids = level_token_ids(sp_tok, prefix)
    assert sp_tok.convert_ids_to_tokens(ids) == ["\u2581" + w for w in LEVELS]

    # No single-token form: the error names the word.
    partial = tiny_vlms.make_tokenizer([], levels=("bad", "poor", "fair", "excellent"))
    with pytest.raises(LevelTokenError, match="'good'"):
        level_token_ids(partial, prefix)


def test_hub_id_missing_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFound) as err:
        load_chat_vlm("q-future/not-in-this-cache")
    msg = str(err.value)
    assert "q-future/not-in-this-cache" in msg
    assert str(tmp_path / "hub") in msg
    assert "HF_HUB_OFFLINE" in msg and "hf download q-future/not-in-this-cache" in msg
    with pytest.raises(ModelNotFound, match="no model directory"):
        load_chat_vlm(str(tmp_path / "no" / "such" / "dir"))


def test_hub_id_loads_from_the_cache_offline(monkeypatch, tmp_path, qwen, images):
    """A hub id resolves through the normal HF cache layout (models--org--name/snapshots/<rev>)."""
    path, b = qwen
    repo = tmp_path / "hub" / "models--qalign-test--tiny-qwen"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(path, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = load_chat_vlm("qalign-test/tiny-qwen")
    assert cached.info.name == "qalign-test/tiny-qwen"
    torch.testing.assert_close(cached.level_logits(_items(b, images[:2])), b.level_logits(_items(b, images[:2])))
