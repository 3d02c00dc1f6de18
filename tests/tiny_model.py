"""A tiny RANDOM qalign-tiny folder, built locally without the real bases (no SmolLM2, no
EfficientNet weights, no network).

``build_tiny_folder(path)`` writes what ``qalign.load(path)`` / ``qalign score --model path`` read:

    config.json              QAlignTinyConfig (model_type "qalign_tiny") at toy size
    model.safetensors        every weight (random, seeded), so no base is assembled
    tokenizer.json, ...      a word-level tokenizer with the ChatML specials and the five level
                             words as single tokens *with* their leading space (" good")

The weights are re-initialised to be "loud": with the default init every image scores 3.048 give
or take 1e-8, which would let a scorer that ignores the pixels (or mixes up rows) pass the tests.
With fan-in scaled weights different images differ by tenths of a point.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

LEVELS = ("bad", "poor", "fair", "good", "excellent")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]")
# Pieces: an optional single leading space + a word, or one punctuation mark (with optional
# space), or a newline, or a lone space. " good" is one piece; so is "\n".
PIECE_PATTERN = r" ?[A-Za-z0-9_']+| ?[^\sA-Za-z0-9_']|\n| "
SEED = 1234
IMAGE_SIZE = 64


def _corpus() -> list[str]:
    """Every string the qalign-tiny prompter and trainer ever tokenises, plus a little more."""
    from qalign.prompts import INPUTS, TASKS, answer, answer_prefix, question, training_questions

    lines = ["user", "assistant", "system", "\n", " ", "USER: ASSISTANT:", "You are a helpful assistant."]
    for task in TASKS:
        for kind in INPUTS:
            lines.append(question(task, kind))
            lines.append(answer_prefix(task, kind))
            lines.extend(training_questions(task, kind))
            for word in LEVELS:
                lines.append(answer(word, task, kind))
    for word in LEVELS:
        lines += [word, " " + word, f" {word}."]
    return lines


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` (word level over a fixed regex split) for the Q-Align prompts."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab.setdefault(tok, len(vocab))
    for line in _corpus():
        for piece in re.findall(PIECE_PATTERN, line):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def build_config(vocab_size: int):
    from transformers import LlamaConfig

    from qalign.models.tiny.configuration_qalign_tiny import QAlignTinyConfig

    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    return QAlignTinyConfig(
        image_size=IMAGE_SIZE,
        grid_size=2,
        abstractor_hidden_size=32,
        abstractor_layers=1,
        abstractor_heads=2,
        abstractor_intermediate_size=64,
        num_queries=4,
        text_config=text,
    )


def make_loud(model, seed: int = SEED) -> None:
    """Seeded fan-in init of every weight so that the pixels visibly move the level logits."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                normal_(module.weight, math.sqrt(2.0 / fan_in))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
            elif isinstance(module, nn.Linear):
                normal_(module.weight, 1.0 / math.sqrt(module.in_features))
                if module.bias is not None:
                    normal_(module.bias, 0.1)
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, 1.0)
        abstractor = model.visual_abstractor
        normal_(abstractor.position, 0.1)
        normal_(abstractor.query_embeds, 0.1)
        normal_(abstractor.vit_eos, 1.0)
        # Louder projection into the LLM: the visual tokens should dominate the prompt.
        abstractor.visual_fc.weight.mul_(3.0)
    model.language_model.tie_weights()


def build_model(config, seed: int = SEED):
    import torch

    from qalign.models.tiny.modeling_qalign_tiny import QAlignTinyForConditionalGeneration

    torch.manual_seed(seed)
    model = QAlignTinyForConditionalGeneration(config)
    make_loud(model, seed)
    return model.eval()


def build_tiny_folder(path: str | Path, seed: int = SEED) -> Path:
    """Write a complete random qalign-tiny folder (config, full weights, tokenizer) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(len(tokenizer))
    model = build_model(config, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- test images

def make_image(index: int, size: tuple[int, int] | None = None):
    """A deterministic RGB image; different ``index`` -> visibly different content and size."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(index)
    w, h = size or (48 + 7 * (index % 5), 40 + 5 * (index % 4))
    kind = index % 4
    if kind == 0:  # noise of varying strength around a colour
        base = rng.integers(0, 256, 3)
        arr = base + rng.normal(0, 10 + 8 * index, (h, w, 3))
    elif kind == 1:  # gradient
        x = np.linspace(0, 255, w)[None, :, None]
        y = np.linspace(0, 255, h)[:, None, None]
        arr = x * rng.random(3) + y * rng.random(3)
    elif kind == 2:  # checkerboard of varying period
        period = 2 + index % 7
        board = (np.indices((h, w)).sum(0) // period) % 2
        arr = board[..., None] * rng.integers(0, 256, 3) + (1 - board[..., None]) * rng.integers(0, 256, 3)
    else:  # blurred noise
        arr = rng.integers(0, 256, (h, w, 3))
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if kind == 3:
        image = image.filter(ImageFilter.GaussianBlur(1 + index % 3))
    return image


def write_images(folder: Path, n: int, start: int = 0, fmt: str = "png") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img_{i:03d}.{fmt}"
        make_image(i).save(path)
        paths.append(str(path))
    return paths
