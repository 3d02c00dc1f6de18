"""Any stock chat vision-language model as a Q-Align backend.

Loads a model with ``AutoModelForImageTextToText`` + ``AutoProcessor`` (never remote code, safetensors
only by default) and asks it the Q-Align question through the processor's own chat template:

    <chat template: user turn = [image, question], add_generation_prompt=True> + "The quality of the image is"

The logits of the five level words (bad..excellent) at the last prompt position are the result. This
covers Q-ReAlign (Qwen3.5, ``model_type`` ``qwen3_5``; its scores are published on [0, 1]) and any
Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA / LLaVA-OneVision / SmolVLM / Idefics3 / InternVL (``-hf``)
checkpoint fine-tuned with the five-word answer -- or used zero-shot.

Design notes
------------
* Batching never changes a score. Prompts are padded on the RIGHT, so every real token keeps the
  positions (and, for Qwen's multimodal RoPE and Qwen3.5's linear-attention layers, the state) it has
  at batch size 1; each row is read at its own last real position. Nothing pads the left, so no
  family has to reconstruct position ids from the attention mask.
* Full-vocabulary logits are never formed: for the forward pass the output head is swapped for a
  five-row slice of itself (the level-word rows), so the logits tensor is [B, T, 5].
* ``preprocess`` returns the RGB image as a uint8 tensor [3, H, W] (not a normalised float tensor):
  the model's own processor does resizing / tiling / normalisation and wants the raw image, so
  ``level_logits`` turns each tensor back into a PIL image. It also accepts float tensors (in [0, 1],
  or uint8 values cast to float) and ``PIL.Image`` objects.
* Video: by default every frame is scored as an image (with the image prompt) and the item's level
  logits are the mean over its frames (``ModelInfo.video == "per-frame"``). ``video="native"`` passes
  the frames as one video through the processor's video processor instead; transformers' video
  processors need torchvision, so that path is opt-in and untested here.
* No torchvision: ``AutoProcessor`` cannot load any processor that has a video part (Qwen-VL
  family, LLaVA-OneVision, SmolVLM, InternVL), even for images. :func:`load_processor` then loads
  the same processor class without its video processor; images are processed by the PIL image
  processors (``*ImageProcessorPil``), which transformers picks itself when torchvision is absent.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

from ..levels import LEVELS
from ..prompts import answer_prefix, question
from .base import Backend, ModelInfo
from .hub import hub_cache_dir, hub_offline

# Families checked end to end with tiny random checkpoints (tests/test_chat_vlm.py). Other
# ``AutoModelForImageTextToText`` types are attempted too; these are the ones known to work.
TESTED_MODEL_TYPES: tuple[str, ...] = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "llava",
    "llava_onevision",
    "smolvlm",
    "idefics3",
    "internvl",
)

# Model types whose published Q-Align fine-tunes report scores on [0, 1] (Q-ReAlign).
NATIVE_RANGE: dict[str, str] = {"qwen3_5": "0-1"}

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json")


class LevelTokenError(ValueError):
    """A level word is not one token of the model's vocabulary after the answer prefix."""


class ModelNotFound(FileNotFoundError):
    """A hub id that is not in the local Hugging Face cache (offline) or cannot be fetched."""


# ----------------------------------------------------------------------------------------------
# Level tokens
# ----------------------------------------------------------------------------------------------


def level_token_ids(tokenizer, prefix: str, words: Sequence[str] = LEVELS) -> list[int]:
    """Token id of each level word as the model would say it right after ``prefix``.

    For each word the forms ``" word"`` and ``"word"`` are tried, in that order. A form is accepted
    when ``prefix + form`` tokenises to the tokens of ``prefix`` plus exactly one more token (so the
    choice agrees with how the prefix ends: BPE vocabularies such as Qwen's and GPT-2's need the
    leading space, SentencePiece ones fold it into the word piece). Raises :class:`LevelTokenError`
    naming the word when neither form is one token there.
    """
    base = tokenizer.encode(prefix, add_special_tokens=False)
    ids: list[int] = []
    for word in words:
        chosen = None
        for form in (" " + word, word):
            full = tokenizer.encode(prefix + form, add_special_tokens=False)
            if len(full) == len(base) + 1 and full[: len(base)] == base:
                chosen = full[-1]
                break
        if chosen is None:
            pieces = {
                form: tokenizer.convert_ids_to_tokens(tokenizer.encode(prefix + form, add_special_tokens=False))[
                    len(base):
                ]
                for form in (" " + word, word)
            }
            raise LevelTokenError(
                f"the level word {word!r} is not a single token of this model's tokenizer after {prefix!r} "
                f"(it comes out as {pieces[' ' + word]!r} with a leading space and {pieces[word]!r} without); "
                "Q-Align needs every level word (bad, poor, fair, good, excellent) to be one token"
            )
        ids.append(int(chosen))
    if len(set(ids)) != len(ids):
        raise LevelTokenError(f"level words map to repeated token ids {ids}; the tokenizer cannot tell them apart")
    return ids


# ----------------------------------------------------------------------------------------------
# Finding and loading a checkpoint
# ----------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict | None:
    """``config.json`` of a local directory as a dict, or None."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_chat_vlm_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a checkpoint this backend can load.

    The test the registry should use: a directory with a ``config.json`` whose ``model_type`` is one
    that ``AutoModelForImageTextToText`` maps (without remote code) and a processor config or chat
    template beside it.
    """
    cfg = read_config(path)
    if not cfg or "model_type" not in cfg:
        return False
    if not any((Path(path) / f).is_file() for f in _PROCESSOR_FILES):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return cfg["model_type"] in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_FILES = ["*.json", "*.jinja", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def resolve_model_dir(name_or_path: str | os.PathLike, *, use_safetensors: bool = True) -> str:
    """A local directory for ``name_or_path``: the directory itself, or the hub id's cached snapshot.

    A hub id (``org/name``) goes through the normal Hugging Face cache and honours
    ``HF_HUB_OFFLINE``; when it is not available :class:`ModelNotFound` says which id, where the
    cache looks and how to pre-download it.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{str(path)!r} is a directory but holds no config.json; it is not a model checkpoint")
        return str(path)
    name = str(name_or_path)
    if not _HUB_ID.match(name) or name.endswith((".json", ".safetensors", ".gguf", ".bin")):
        raise ModelNotFound(f"no model directory at {name!r} (and it is not a Hugging Face hub id)")
    offline = hub_offline()
    cache = str(hub_cache_dir())
    try:
        from huggingface_hub import snapshot_download

        patterns = _HUB_FILES if use_safetensors else [*_HUB_FILES, "*.bin"]
        return snapshot_download(repo_id=name, cache_dir=cache, local_files_only=offline, allow_patterns=patterns)
    except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors
        how = (
            f"pre-download it where there is network access with `hf download {name}` (older clients: "
            f"`huggingface-cli download {name}`) into that cache -- set HF_HOME or HF_HUB_CACHE to choose it -- "
            "or pass the path of a local checkpoint directory"
        )
        if offline:
            msg = (
                f"model {name!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, "
                f"so it cannot be downloaded; {how}"
            )
        else:
            msg = f"could not get model {name!r} from the Hugging Face hub (cache: {cache}): {exc}; {how}"
        raise ModelNotFound(msg) from exc


_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def _resolve_dtype(dtype, device: str):
    import torch

    if dtype is None or dtype == "auto":
        if str(device).startswith("cuda") and torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[key])


def load_chat_vlm(
    name_or_path: str | os.PathLike,
    device: str = "cpu",
    dtype=None,
    *,
    tasks: Sequence[str] = ("quality", "aesthetics"),
    video: str = "per-frame",
    video_fps: float = 1.0,
    image_first: bool = True,
    chat_template_kwargs: dict | None = None,
    max_batch: int = 16,
    use_safetensors: bool = True,
    name: str | None = None,
) -> "ChatVLMBackend":
    """Load a chat VLM checkpoint (local directory or hub id) as a :class:`ChatVLMBackend`.

    ``dtype``: None picks float32 on CPU and bfloat16 (float16 where unsupported) on CUDA.
    ``video``: "per-frame" (default) scores each frame as an image and averages the level logits;
    "native" passes the frames as one video (needs a processor with a video processor, i.e.
    torchvision; the frames are taken to be sampled at ``video_fps`` frames per second). Opt-in and
    untested here (no torchvision).
    ``image_first``: the user turn is [image, question] (True) or [question, image].
    ``chat_template_kwargs``: extra template variables; ``enable_thinking=False`` is the default so
    that thinking templates (Qwen3.5) close the thinking block before the answer prefix.
    ``max_batch``: the most prompts one forward pass holds (videos scored per frame multiply them).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    local = resolve_model_dir(name_or_path, use_safetensors=use_safetensors)
    try:
        config = AutoConfig.from_pretrained(local, trust_remote_code=False)
    except ValueError as exc:
        cfg = read_config(local) or {}
        raise ValueError(
            f"{str(name_or_path)!r} (model_type {cfg.get('model_type')!r}) is not a model this version of "
            "transformers can build without remote code; qalign never runs remote code. Use a checkpoint "
            f"converted to transformers' own classes (e.g. the '-hf' variants). ({exc})"
        ) from exc
    torch_dtype = _resolve_dtype(dtype, device)
    try:
        extra = {} if str(device) == "cpu" else {"device_map": str(device)}
        model = AutoModelForImageTextToText.from_pretrained(
            local, config=config, dtype=torch_dtype, trust_remote_code=False, use_safetensors=use_safetensors, **extra
        )
    except OSError as exc:
        if use_safetensors and "safetensors" in str(exc).lower():
            raise OSError(
                f"{str(name_or_path)!r} has no safetensors weights; qalign loads safetensors only by default "
                "(pass use_safetensors=False to accept pickled .bin weights from a source you trust)"
            ) from exc
        raise
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ValueError(
                f"{str(name_or_path)!r} has model_type {config.model_type!r}, which is not an image-text-to-text "
                "chat model in this version of transformers"
            ) from exc
        raise
    processor = load_processor(local)
    return ChatVLMBackend(
        model,
        processor,
        name=name or str(name_or_path),
        device=device,
        tasks=tasks,
        video=video,
        video_fps=video_fps,
        image_first=image_first,
        chat_template_kwargs=chat_template_kwargs,
        max_batch=max_batch,
    )


def image_only_processor_class(cls):
    """``cls`` (a transformers processor class) without its video processor.

    transformers' video processors need torchvision; without it ``AutoProcessor`` cannot load the
    processors of Qwen2/2.5/3-VL, Qwen3.5, LLaVA-OneVision, SmolVLM or InternVL at all, even to
    process images. This subclass drops the video sub-processor (``video_processor`` is None) and
    keeps everything else: tokenizer, image processor, chat template and processor settings.
    """
    import inspect

    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    video_args = [(i, p) for i, p in enumerate(params) if "video" in p and "processor" in p]
    attributes = [a for a in cls.get_attributes() if "video" not in a]

    class ImageOnly(cls):
        video_processor = None

        @classmethod
        def get_attributes(klass):
            return list(attributes)

        @classmethod
        def from_args_and_dict(klass, args, processor_dict, **kwargs):
            args = list(args)
            for i, _ in video_args:  # some processors take video_processor as a required argument
                if len(args) == i:
                    args.append(None)
            return super().from_args_and_dict(args, processor_dict, **kwargs)

    ImageOnly.__name__ = cls.__name__
    ImageOnly.__qualname__ = cls.__qualname__
    return ImageOnly


def _processor_class(local: str):
    from transformers.models.auto.processing_auto import processor_class_from_name

    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        p = Path(local) / fname
        if p.is_file():
            try:
                name = json.loads(p.read_text(encoding="utf-8")).get("processor_class")
            except (OSError, ValueError):
                name = None
            if name:
                cls = processor_class_from_name(name)
                if cls is not None:
                    return cls
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    config = AutoConfig.from_pretrained(local, trust_remote_code=False)
    return PROCESSOR_MAPPING[type(config)]


def load_processor(local: str):
    """The processor of a local checkpoint (``AutoProcessor``), never with remote code.

    Without torchvision -- or when a checkpoint ships no video processor config -- the processor is
    loaded without its video part (see :func:`image_only_processor_class`); images work the same.
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        cls = _processor_class(local)
    except Exception:
        cls = None
    has_video = cls is not None and any("video" in a for a in cls.get_attributes())
    if has_video and not is_torchvision_available():
        return image_only_processor_class(cls).from_pretrained(local, trust_remote_code=False)
    try:
        return AutoProcessor.from_pretrained(local, trust_remote_code=False)
    except (OSError, ImportError) as exc:
        if has_video and "video" in str(exc).lower():
            return image_only_processor_class(cls).from_pretrained(local, trust_remote_code=False)
        raise


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------


def _find_parent(root, target):
    """(parent module, attribute name) under which ``target`` sits in ``root``."""
    for _, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    return None, None


class ChatVLMBackend(Backend):
    """A Q-Align backend over a transformers image-text-to-text chat model and its processor."""

    def __init__(
        self,
        model,
        processor,
        *,
        name: str = "chat-vlm",
        device: str = "cpu",
        tasks: Sequence[str] = ("quality", "aesthetics"),
        video: str = "per-frame",
        video_fps: float = 1.0,
        image_first: bool = True,
        chat_template_kwargs: dict | None = None,
        max_batch: int = 16,
    ):
        import torch

        if getattr(model, "hf_device_map", None) is None:
            model = model.to(device)
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.video_fps = float(video_fps)
        self.dtype = next(model.parameters()).dtype
        self.image_first = image_first
        self.chat_template_kwargs = {"enable_thinking": False, **(chat_template_kwargs or {})}
        self.max_batch = max(1, int(max_batch))
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("the processor has no tokenizer")
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{name!r} has no chat template (chat_template.jinja); it is not a chat model")
        if self.tokenizer.pad_token_id is None:
            pad = self.tokenizer.eos_token if self.tokenizer.eos_token is not None else self.tokenizer.unk_token
            if pad is None:
                raise ValueError("the tokenizer has neither a pad, eos nor unk token to pad batches with")
            self.tokenizer.pad_token = pad
        # Right padding: real tokens keep their batch-of-one positions; each row is read at its end.
        self.tokenizer.padding_side = "right"

        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError("the model has no output embedding (lm_head) to read level logits from")
        self._head = head
        self._head_parent, self._head_attr = _find_parent(model, head)
        if self._head_parent is None:
            raise ValueError("could not locate the model's output head module")

        can_video = getattr(processor, "video_processor", None) is not None
        if video not in ("native", "per-frame"):
            raise ValueError(f"video must be 'native' or 'per-frame', got {video!r}")
        if video == "native" and not can_video:
            raise ValueError(
                "this processor has no video processor (transformers' video processors need torchvision); "
                "use video='per-frame'"
            )
        model_type = getattr(model.config, "model_type", "?")
        rng = NATIVE_RANGE.get(model_type)
        desc = f"chat VLM ({model_type}) via its chat template"
        if rng:
            desc += f"; its published scores are on [{rng.replace('-', ', ')}]"
        self.model_type = model_type
        self.native_range = rng
        self.info = ModelInfo(name=name, tasks=tuple(tasks), video=video, description=desc)
        self._level_ids: dict[str, list[int]] = {}
        self._lock = threading.Lock()  # the head swap in _forward is not re-entrant

    # -- prompts --------------------------------------------------------------------------------

    def prompt_text(self, task: str = "quality", input_kind: str = "image", media: str = "image") -> str:
        """The full prompt string (chat template + answer prefix) before the processor expands media."""
        q = question(task, input_kind)
        parts: list[dict[str, Any]] = [{"type": media}, {"type": "text", "text": q}]
        if not self.image_first:
            parts.reverse()
        conversation = [{"role": "user", "content": parts}]
        template = self._template()
        extra = {k: v for k, v in self.chat_template_kwargs.items() if _reads(template, k)}
        render = dict(chat_template=template, add_generation_prompt=True, tokenize=False, **extra)
        try:
            text = self.processor.apply_chat_template(conversation, **render)
        except AttributeError:
            # Some processors' own apply_chat_template reach for the video processor, which is absent
            # without torchvision; the tokenizer renders the same template.
            text = self.tokenizer.apply_chat_template(conversation, **render)
        if isinstance(text, list):
            text = text[0]
        prefix = answer_prefix(task, input_kind)
        if text and not text[-1].isspace() and not any(
            text.endswith(tok) for tok in self._special_tokens() if tok
        ):
            text += " "
        return text + prefix

    def _template(self) -> str:
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            if "default" not in template:
                raise ValueError(f"the processor has several chat templates ({', '.join(template)}) but no 'default'")
            template = template["default"]
        return template

    def _special_tokens(self) -> list[str]:
        tok = self.tokenizer
        specials = set(getattr(tok, "all_special_tokens", []) or [])
        try:
            specials.update(str(t) for t in tok.get_added_vocab())
        except Exception:
            pass
        return sorted(specials, key=len, reverse=True)

    def level_ids(self, task: str = "quality", input_kind: str = "image") -> list[int]:
        """Token ids of bad..excellent after this task's answer prefix (cached)."""
        prefix = answer_prefix(task, input_kind)
        if prefix not in self._level_ids:
            self._level_ids[prefix] = level_token_ids(self.tokenizer, prefix)
        return self._level_ids[prefix]

    # -- media ----------------------------------------------------------------------------------

    def preprocess(self, image):
        """RGB ``PIL.Image`` -> uint8 tensor [3, H, W]; the processor resizes inside ``level_logits``."""
        import numpy as np
        import torch

        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    @staticmethod
    def _to_pil(frame):
        import numpy as np
        import torch
        from PIL import Image

        if isinstance(frame, Image.Image):
            return frame.convert("RGB")
        t = torch.as_tensor(frame).detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            t = t.float()
            scale = 1.0 if float(t.max()) > 1.0 else 255.0  # floats in [0, 1], or uint8 values cast to float
            t = (t * scale).round().clamp(0.0, 255.0).to(torch.uint8)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return Image.fromarray(np.ascontiguousarray(t.permute(1, 2, 0).numpy()))

    def _frames(self, item) -> list:
        from PIL import Image

        if isinstance(item, Image.Image):
            return [item.convert("RGB")]
        if isinstance(item, (list, tuple)):
            return [self._to_pil(f) for f in item]
        ndim = getattr(item, "ndim", None)
        if ndim == 3:
            return [self._to_pil(item)]
        if ndim == 4:
            return [self._to_pil(f) for f in item]
        raise ValueError(f"expected a tensor [F, C, H, W] or [C, H, W] per item, got {type(item).__name__}")

    # -- scoring --------------------------------------------------------------------------------

    @contextmanager
    def _sliced_head(self, ids: list[int]):
        """Swap the output head for its rows ``ids`` for the duration of a forward pass."""
        import torch

        w = self._head.weight[ids].detach()
        b = getattr(self._head, "bias", None)
        small = torch.nn.Linear(w.shape[1], len(ids), bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            small.weight.copy_(w)
            if b is not None:
                small.bias.copy_(b[ids].detach())
        setattr(self._head_parent, self._head_attr, small)
        try:
            yield
        finally:
            setattr(self._head_parent, self._head_attr, self._head)

    def model_inputs(self, prompts: Sequence[str], media: Sequence, kind: str = "image"):
        """Processor outputs (CPU tensors) for prompts holding one image (PIL) or one video (frames) each.

        Rows are padded on the right; ``attention_mask.sum(1) - 1`` is each row's last real position.
        """
        kwargs: dict[str, Any] = {
            "text": list(prompts), "padding": True, "padding_side": "right", "return_tensors": "pt",
        }
        bos = self.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):
            kwargs["add_special_tokens"] = False  # the template already wrote it
        if kind == "image":
            inputs = self.processor(images=[[m] for m in media], **kwargs)
        elif kind == "video":
            import numpy as np

            videos = [np.stack([np.asarray(f) for f in frames]) for frames in media]
            metadata = [
                {"fps": self.video_fps, "total_num_frames": len(v), "frames_indices": list(range(len(v)))}
                for v in videos
            ]
            inputs = self.processor(videos=videos, video_metadata=metadata, do_sample_frames=False, **kwargs)
        else:
            raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
        mask = inputs["attention_mask"]
        if not bool((mask[:, 0] == 1).all() and (mask[:, 1:] <= mask[:, :-1]).all()):
            raise RuntimeError("the processor did not pad the prompts on the right")
        return inputs

    def _forward(self, prompts: list[str], media: list, kind: str, ids: list[int]):
        """Level logits [B, 5] (float32, CPU) read at each row's own last prompt position."""
        import torch

        inputs = self.model_inputs(prompts, media, kind)
        last = inputs["attention_mask"].sum(dim=1) - 1
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        for k in ("pixel_values", "pixel_values_videos"):
            if k in inputs and inputs[k].is_floating_point():
                inputs[k] = inputs[k].to(self.dtype)
        with self._lock, torch.inference_mode(), self._sliced_head(ids):
            logits = self.model(**inputs, use_cache=False).logits  # [B, T, 5]
        rows = logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]
        return rows.float().cpu()

    def level_logits(self, items: Sequence, task: str = "quality", input_kind: str = "image"):
        """Level logits [B, 5] (bad..excellent), float32 on CPU, one row per item.

        ``items``: per item a uint8 tensor [F, 3, H, W] (or [3, H, W]; floats in [0, 1] and PIL
        images are accepted too). Videos in "per-frame" mode: every frame is scored with the image
        prompt and the item's row is the mean of its frames' level logits.
        """
        import torch

        self.check_task(task, input_kind)
        if len(items) == 0:
            return torch.zeros((0, 5), dtype=torch.float32)
        frames = [self._frames(it) for it in items]
        if input_kind == "video" and self.info.video == "native":
            prompt = self.prompt_text(task, "video", media="video")
            ids = self.level_ids(task, "video")
            return torch.cat(
                [self._forward([prompt] * len(c), c, "video", ids) for c in _chunks(frames, self.max_batch)]
            )
        prompt = self.prompt_text(task, "image")
        ids = self.level_ids(task, "image")
        flat = [f for fs in frames for f in fs]
        out = torch.cat([self._forward([prompt] * len(c), c, "image", ids) for c in _chunks(flat, self.max_batch)])
        counts = [len(fs) for fs in frames]
        return torch.stack([rows.mean(dim=0) for rows in torch.split(out, counts)])


def _reads(template: str, name: str) -> bool:
    """Whether a chat template mentions the variable ``name`` (only those extra kwargs are passed)."""
    return re.search(rf"\b{re.escape(name)}\b", template) is not None


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
