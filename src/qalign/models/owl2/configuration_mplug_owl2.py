"""Configuration of mPLUG-Owl2 as released with Q-Align / OneAlign / DeQA-Score.

The checkpoints' ``config.json`` is a LLaMA-2 config (model_type ``mplug_owl2``) plus a
``visual_config`` dict holding two full ``PretrainedConfig.to_dict()`` dumps, one for the vision
encoder (``visual_model``) and one for the visual abstractor (``visual_abstractor``). Only the
model-relevant keys of those dumps are read (see ``VISION_DEFAULTS`` / ``ABSTRACTOR_DEFAULTS``);
the generic ones (``id2label``, ``bad_words_ids``, ...) are dropped. ``auto_map`` is ignored: this
package never runs checkpoint code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from transformers.models.llama.configuration_llama import LlamaConfig

# Class defaults of the official code = the values of the released 7B checkpoints.
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 448,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}
ABSTRACTOR_DEFAULTS: dict[str, Any] = {
    "num_learnable_queries": 64,
    "hidden_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "intermediate_size": 2816,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-6,
    "encoder_hidden_size": 1024,
    "grid_size": 32,
}
_SUB_MODEL_TYPES = {"visual_model": "mplug_owl_vision_model", "visual_abstractor": "mplug_owl_visual_abstract"}


@dataclass(frozen=True)
class VisionSettings:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float
    initializer_range: float
    initializer_factor: float

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class AbstractorSettings:
    num_learnable_queries: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    attention_probs_dropout_prob: float
    initializer_range: float
    layer_norm_eps: float
    encoder_hidden_size: int
    grid_size: int


def _clean(section: str, given: dict | None, defaults: dict[str, Any]) -> dict[str, Any]:
    given = dict(given or {})
    if hasattr(given, "to_dict"):  # a PretrainedConfig passed in by hand
        given = given.to_dict()
    out = {k: given.get(k, v) for k, v in defaults.items()}
    out["model_type"] = _SUB_MODEL_TYPES[section]
    return out


def clean_visual_config(visual_config: dict | None) -> dict[str, dict[str, Any]]:
    """Keep only the model-relevant keys of ``visual_config`` (defaults for the missing ones)."""
    visual_config = dict(visual_config or {})
    return {
        "visual_model": _clean("visual_model", visual_config.get("visual_model"), VISION_DEFAULTS),
        "visual_abstractor": _clean(
            "visual_abstractor", visual_config.get("visual_abstractor"), ABSTRACTOR_DEFAULTS
        ),
    }


class MPLUGOwl2Config(LlamaConfig):
    """LLaMA-2 fields + ``visual_config`` {visual_model, visual_abstractor}.

    Defaults are those of the released 7B checkpoints (``rms_norm_eps`` 1e-6,
    ``max_position_embeddings`` 2048, untied head).
    """

    model_type = "mplug_owl2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, visual_config: dict | None = None, **kwargs):
        # Remote-code pointers and training-only flags of the official files: never used.
        kwargs.pop("auto_map", None)
        kwargs.setdefault("rms_norm_eps", 1e-6)
        kwargs.setdefault("max_position_embeddings", 2048)
        kwargs.setdefault("tie_word_embeddings", False)
        self.visual_config = clean_visual_config(visual_config)
        super().__init__(**kwargs)

    @property
    def vision_settings(self) -> VisionSettings:
        d = self.visual_config["visual_model"]
        return VisionSettings(**{f.name: d[f.name] for f in fields(VisionSettings)})

    @property
    def abstractor_settings(self) -> AbstractorSettings:
        d = self.visual_config["visual_abstractor"]
        return AbstractorSettings(**{f.name: d[f.name] for f in fields(AbstractorSettings)})

    @property
    def rope_base(self) -> float:
        """RoPE theta, whichever way this transformers version stores it."""
        params = getattr(self, "rope_parameters", None)
        if isinstance(params, dict) and params.get("rope_theta") is not None:
            return float(params["rope_theta"])
        return float(getattr(self, "rope_theta", None) or 10000.0)


__all__ = ["MPLUGOwl2Config", "VisionSettings", "AbstractorSettings", "clean_visual_config"]
