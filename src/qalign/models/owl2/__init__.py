"""Native mPLUG-Owl2: the official Q-Align / OneAlign / DeQA-Score checkpoints without remote code.

Importing this package registers ``model_type="mplug_owl2"`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` works without
``trust_remote_code`` (the checkpoints' own ``*.py`` files and ``auto_map`` are never used).
Scoring goes through :func:`load_owl2`, which returns an :class:`Owl2Backend`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_mplug_owl2 import MPLUGOwl2Config
from .modeling_mplug_owl2 import IMAGE_TOKEN_INDEX, MPLUGOwl2LlamaForCausalLM, MPLUGOwl2Model

AutoConfig.register(MPLUGOwl2Config.model_type, MPLUGOwl2Config, exist_ok=True)
AutoModelForCausalLM.register(MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM, exist_ok=True)

from .backend import Owl2Backend, load_owl2, load_owl2_model, load_tokenizer, preprocess_image  # noqa: E402
from ..official import CHECKPOINTS, Owl2Checkpoint, lookup  # noqa: E402

__all__ = [
    "CHECKPOINTS",
    "IMAGE_TOKEN_INDEX",
    "MPLUGOwl2Config",
    "MPLUGOwl2LlamaForCausalLM",
    "MPLUGOwl2Model",
    "Owl2Backend",
    "Owl2Checkpoint",
    "load_owl2",
    "load_owl2_model",
    "load_tokenizer",
    "lookup",
    "preprocess_image",
]
