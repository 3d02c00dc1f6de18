"""Tiny random chat VLM checkpoints built locally (no hub), one per transformers family.

Each builder writes a complete checkpoint directory -- ``config.json`` + safetensors weights, a
byte-level BPE tokenizer trained here on a few Q-Align sentences (so the level words are single
tokens with and without a leading space), the family's special / image / video tokens, a PIL
image processor (there is no torchvision) and a chat template written for the family's turn format
-- exactly as ``save_pretrained`` would for a real model. The weights are random: the tests check
plumbing (prompt, tokens, batching), not scores.
"""

from __future__ import annotations

import inspect

from pathlib import Path
from typing import Callable

LEVELS = ("bad", "poor", "fair", "good", "excellent")
HIDDEN = 64


def _corpus(levels) -> list[str]:
    lines = []
    for task in ("quality", "aesthetics"):
        for kind in ("image", "video", "picture", "clip"):
            lines.append(f"How would you rate the {task} of this {kind}?")
            for w in levels:
                lines.append(f"The {task} of the {kind} is {w}.")
    for w in levels:
        lines += [w, f"{w} {w}", f" {w}"]
    lines += ["system user assistant User Assistant You are a helpful assistant.", "USER: ASSISTANT:"]
    return lines * 20


def make_tokenizer(specials: list[str], *, levels=LEVELS, eos: str = "<|endoftext|>", pad: str | None = None,
                   bos: str | None = None, extra: dict | None = None):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) whose vocabulary holds ``levels`` as single tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base_specials = [t for t in (eos, pad, bos) if t]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(dict.fromkeys(base_specials)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(levels), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    kwargs = dict(tokenizer_object=tok, eos_token=eos, pad_token=pad or eos)
    if bos:
        kwargs["bos_token"] = bos
    kwargs.update(extra or {})
    return PreTrainedTokenizerFast(**kwargs)


def _ids(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _vocab(tokenizer) -> int:
    return (len(tokenizer) + 63) // 64 * 64


def _save(model, processor, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def _special_ids(tok) -> dict:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _seed():
    import torch

    torch.manual_seed(0)


def _processor(processor_cls, **kwargs):
    """The processor, minus its video processor when transformers cannot build one (no torchvision)."""
    from transformers.utils import is_torchvision_available

    from qalign.models.chat_vlm import image_only_processor_class

    if not is_torchvision_available():
        processor_cls = image_only_processor_class(processor_cls)
        if "video_processor" in inspect.signature(processor_cls.__init__).parameters:
            kwargs["video_processor"] = None
    return processor_cls(**kwargs)


# ----- chat templates (written here; one per turn format) ----------------------------------------

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3.5 closes an empty thinking block when asked not to think.
QWEN35_TEMPLATE = QWEN_TEMPLATE[: -len("{% endif %}")] + (
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SMOL_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>", "<think>", "</think>"]


# ----- builders -----------------------------------------------------------------------------------


def _qwen_processor(processor_cls, tokenizer, patch: int, merge: int = 2, temporal: int = 2, template=None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch * merge
    ip = Qwen2VLImageProcessorPil(
        min_pixels=(2 * factor) ** 2, max_pixels=(4 * factor) ** 2, patch_size=patch, merge_size=merge,
        temporal_patch_size=temporal,
    )
    return _processor(processor_cls, image_processor=ip, tokenizer=tokenizer, chat_template=template or QWEN_TEMPLATE)


def _qwen_token_ids(tok) -> dict:
    image, video, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)


def build_qwen2_vl(out: Path, levels=LEVELS) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = make_tokenizer(QWEN_SPECIALS, levels=levels)
    text = dict(vocab_size=_vocab(tok), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, **_special_ids(tok),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=14)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tok))
    _seed()
    return _save(Qwen2VLForConditionalGeneration(cfg), _qwen_processor(Qwen2VLProcessor, tok, 14), out)


def build_qwen2_5_vl(out: Path, levels=LEVELS) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = make_tokenizer(QWEN_SPECIALS, levels=levels)
    text = dict(vocab_size=_vocab(tok), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, **_special_ids(tok),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, out_hidden_size=HIDDEN,
                  window_size=56, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tok))
    _seed()
    return _save(Qwen2_5_VLForConditionalGeneration(cfg), _qwen_processor(Qwen2_5_VLProcessor, tok, 14), out)


def build_qwen3_vl(out: Path, levels=LEVELS) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok = make_tokenizer(QWEN_SPECIALS, levels=levels)
    text = dict(vocab_size=_vocab(tok), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, **_special_ids(tok), head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, out_hidden_size=HIDDEN,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tok))
    _seed()
    return _save(Qwen3VLForConditionalGeneration(cfg), _qwen_processor(Qwen3VLProcessor, tok, 16), out)


def build_qwen3_5(out: Path, levels=LEVELS) -> Path:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor

    tok = make_tokenizer(QWEN_SPECIALS, levels=levels)
    text = dict(vocab_size=_vocab(tok), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, **_special_ids(tok), head_dim=16,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=["linear_attention", "full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, out_hidden_size=HIDDEN,
                  num_position_embeddings=64)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, **_qwen_token_ids(tok))
    _seed()
    proc = _qwen_processor(Qwen3VLProcessor, tok, 16, template=QWEN35_TEMPLATE)
    return _save(Qwen3_5ForConditionalGeneration(cfg), proc, out)


def _llama_text(tok, **extra) -> dict:
    return dict(model_type="llama", vocab_size=_vocab(tok), hidden_size=HIDDEN, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)


def _qwen2_text(tok) -> dict:
    return dict(model_type="qwen2", vocab_size=_vocab(tok), hidden_size=HIDDEN, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def build_llava(out: Path, levels=LEVELS) -> Path:
    """LLaVA-1.5 layout: CLIP tower (56 px, 14 px patches), "USER: ... ASSISTANT:" template."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_tokenizer(["<image>"], levels=levels, eos="</s>", bos="<s>")
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama_text(tok, bos_token_id=tok.bos_token_id),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = _processor(LlavaProcessor, image_processor=ip, tokenizer=tok, patch_size=14,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                      chat_template=LLAVA_TEMPLATE)
    _seed()
    return _save(LlavaForConditionalGeneration(cfg), proc, out)


def build_llava_onevision(out: Path, levels=LEVELS) -> Path:
    """LLaVA-OneVision: SigLIP tower, any-resolution tiles (28 px base), Qwen2 text, Qwen turns."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = make_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"], levels=levels)
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_qwen2_text(tok),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                               vision_feature_layer=-1)
    ip = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints)
    template = INTERNVL_TEMPLATE.replace("<IMG_CONTEXT>", "<image>")
    proc = _processor(LlavaOnevisionProcessor, image_processor=ip, tokenizer=tok, num_image_tokens=4,
                      vision_feature_select_strategy="full", chat_template=template)
    _seed()
    return _save(LlavaOnevisionForConditionalGeneration(cfg), proc, out)


def _idefics_like(config_cls, model_cls, processor_cls, processor_module, out: Path, levels, template) -> Path:
    tok = make_tokenizer(["<|im_start|>", "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"],
                         levels=levels, eos="<end_of_utterance>", pad="<|endoftext|>")
    image_token = tok.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                  patch_size=16)
    cfg = config_cls(vision_config=vision, text_config=_llama_text(tok), image_token_id=image_token, scale_factor=2)
    ip_cls = getattr(processor_module, [n for n in dir(processor_module) if n.endswith("ImageProcessorPil")][0])
    ip = ip_cls(size={"longest_edge": 128}, max_image_size={"longest_edge": 64}, do_image_splitting=True)
    proc = _processor(processor_cls, image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)
    _seed()
    return _save(model_cls(cfg), proc, out)


def build_idefics3(out: Path, levels=LEVELS) -> Path:
    """Idefics3: SigLIP-like tower with image splitting (64 px tiles), "User:/Assistant:" turns."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3 import image_processing_pil_idefics3 as mod

    return _idefics_like(Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, mod, out, levels,
                         SMOL_TEMPLATE)


def build_smolvlm(out: Path, levels=LEVELS) -> Path:
    """SmolVLM (needs the ``num2words`` package for its processor)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm import image_processing_pil_smolvlm as mod

    return _idefics_like(SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor, mod, out, levels,
                         SMOL_TEMPLATE)


def build_internvl(out: Path, levels=LEVELS) -> Path:
    """InternVL (transformers-native "-hf" layout): InternViT tower, 56 px tiles, Qwen2 text."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = make_tokenizer(["<|im_start|>", "<|im_end|>", *names.values()], levels=levels,
                         extra={"extra_special_tokens": names})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[56, 56], patch_size=[14, 14])
    cfg = InternVLConfig(vision_config=vision, text_config=_qwen2_text(tok),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                         downsample_ratio=0.5, vision_feature_layer=-1)
    ip = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    proc = _processor(InternVLProcessor, image_processor=ip, tokenizer=tok, image_seq_length=4,
                      chat_template=INTERNVL_TEMPLATE)
    _seed()
    return _save(InternVLForConditionalGeneration(cfg), proc, out)


BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "qwen3_5": build_qwen3_5,
    "llava": build_llava,
    "llava_onevision": build_llava_onevision,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "internvl": build_internvl,
}
