"""Loading the official mPLUG-Owl2 checkpoints and scoring with them (the ``Backend`` contract).

``load_owl2(name_or_path)`` accepts a name from :mod:`qalign.models.official` ("one-align"), a Hugging Face
hub id ("q-future/one-align", resolved through the normal HF cache, honouring HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE at call time) or a local directory in one of the official layouts:

* ``config.json`` + ``model.safetensors``
* ``config.json`` + ``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``
* ``config.json`` + ``pytorch_model-0000x-of-0000y.bin`` + ``pytorch_model.bin.index.json``
  (pickles, read with ``torch.load(weights_only=True)`` only)
* a PEFT adapter folder (``adapter_config.json``): the base model is loaded, the adapter (and
  ``non_lora_trainables.bin`` when present) applied and merged.

Key matching is strict: a missing or unexpected tensor is an error naming it. The only tolerated
differences are the official files' ``rotary_emb.inv_freq`` entries (recomputed) and absent
abstractor position tables (then computed from the formula).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ...levels import LEVELS
from ...prompts import owl_prompt
from ..base import Backend, ModelInfo
from ..hub import hub_cache_dir, hub_offline
from ..official import CHECKPOINTS, Owl2Checkpoint, lookup
from .configuration_mplug_owl2 import MPLUGOwl2Config
from .modeling_mplug_owl2 import (
    IMAGE_TOKEN_INDEX,
    MPLUGOwl2AbstractorAttention,
    MPLUGOwl2LlamaForCausalLM,
)

# ------------------------------------------------------------------------------------------------
# Image preprocessing (exactly the official CLIPImageProcessor path, pixel for pixel)
# ------------------------------------------------------------------------------------------------

IMAGE_SIZE = 448
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104)


def expand_to_square(image: Image.Image, fill=PAD_COLOUR) -> Image.Image:
    """Centre ``image`` on a square canvas of side max(w, h) filled with ``fill``.

    The offset is ((S-w)//2, (S-h)//2): an odd surplus puts the extra pixel right or bottom.
    """
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_image(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One PIL image -> float32 [3, size, size], as the official checkpoints expect.

    Convert to RGB, pad to a square with (122, 116, 104), PIL bicubic resize, scale to [0, 1],
    CLIP mean/std normalisation.

    Deliberate deviation: the official code pads BEFORE converting to RGB. For RGB inputs the
    two orders are identical; for other modes the official order breaks (L/LA/I/F/1 raise a
    TypeError, palette images are garbled, CMYK gets a wrong fill), so we convert first. Alpha
    is dropped without compositing, as PIL's convert("RGB") does upstream.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = expand_to_square(image)
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.BICUBIC)
    x = (np.asarray(image, dtype=np.uint8) * (1 / 255)).astype(np.float32)  # float64 math -> float32
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; enough to read SentencePiece models."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_sentencepiece_model(path: str | os.PathLike) -> list[tuple[str, float, int]]:
    """(piece, score, type) for every entry of a SentencePiece ``tokenizer.model``, in id order."""
    pieces = []
    for number, wire, value in _proto_fields(Path(path).read_bytes()):
        if number == 1 and wire == 2:  # ModelProto.pieces
            piece, score, kind = "", 0.0, 1
            for n2, _, v2 in _proto_fields(value):
                if n2 == 1:
                    piece = bytes(v2).decode("utf-8")
                elif n2 == 2:
                    score = struct.unpack("<f", v2)[0]
                elif n2 == 3:
                    kind = v2
            pieces.append((piece, score, kind))
    if not pieces:
        raise ValueError(f"{path} holds no SentencePiece vocabulary")
    return pieces


def _llama_tokenizer_from_model_file(folder: Path):
    """The LLaMA BPE tokenizer built from ``tokenizer.model`` without sentencepiece/protobuf.

    Same construction as transformers' own SentencePiece conversion (vocab in id order, merges
    ordered by piece score, byte fallback, "▁" metaspace with a prefix on the first piece).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.convert_slow_tokenizer import generate_merges

    pieces = read_sentencepiece_model(folder / "tokenizer.model")
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = generate_merges(vocab, {p: s for p, s, _ in pieces})
    unk, bos, eos = (pieces[i][0] for i in range(3))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (unk, bos, eos)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )
    settings = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        settings = json.loads(config_file.read_text())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=unk,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=settings.get("model_max_length", 2048),
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(folder: str | os.PathLike):
    """The checkpoint's LLaMA tokenizer.

    ``AutoTokenizer`` when it can read the folder (a ``tokenizer.json``, or the sentencepiece
    package for ``tokenizer.model``); otherwise the same BPE tokenizer built directly from
    ``tokenizer.model`` (no extra dependency). Both give the official ids.
    """
    folder = Path(folder)
    has_json = (folder / "tokenizer.json").is_file()
    has_model = (folder / "tokenizer.model").is_file()
    if not has_json and not has_model:
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {folder}")
    if has_json or _sentencepiece_available():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    return _llama_tokenizer_from_model_file(folder)


def _sentencepiece_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentencepiece") is not None and importlib.util.find_spec("google.protobuf") is not None


def prompt_ids(tokenizer, task: str = "quality", input_kind: str = "image") -> list[int]:
    """The official prompt ids: text chunks tokenised separately, one BOS, -200 between."""
    p = owl_prompt(task, input_kind)
    before = tokenizer(p.before_image).input_ids
    after = tokenizer(p.after_image).input_ids
    bos = tokenizer.bos_token_id
    if not before or before[0] != bos or not after or after[0] != bos:
        raise RuntimeError("the tokenizer must prepend BOS to every chunk (LLaMA add_bos_token=True)")
    return before + [IMAGE_TOKEN_INDEX] + after[1:]


def level_token_ids(tokenizer, words: Sequence[str] = LEVELS) -> list[int]:
    """Id of each level word: the second id of tokenizer(word), i.e. right after BOS."""
    ids = []
    for w in words:
        enc = tokenizer(w).input_ids
        if len(enc) != 2:
            raise ValueError(f"level word {w!r} is not a single token for this tokenizer: {enc}")
        ids.append(enc[1])
    return ids


# ------------------------------------------------------------------------------------------------
# Finding the files: local folders and the Hugging Face cache
# ------------------------------------------------------------------------------------------------

_META_FILES = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "non_lora_trainables.bin",
]


class CheckpointError(RuntimeError):
    """A checkpoint folder cannot be used (missing files, wrong keys, wrong format)."""


class WeightsNotCached(CheckpointError):
    """Offline, and the hub cache does not hold the weights."""


def weight_files(folder: Path) -> tuple[str, list[Path], Path | None]:
    """(format, shard paths, index path) of the weights in ``folder``; format "safetensors"|"bin"."""
    for fmt, index_name, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that are not in the folder: {', '.join(missing)}")
            return fmt, shards, index
        if (folder / single).is_file():
            return fmt, [folder / single], None
    return "", [], None


def _has_weights(folder: Path) -> bool:
    try:
        return bool(weight_files(folder)[1]) or (folder / "adapter_config.json").is_file()
    except CheckpointError:
        return False


def _download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"  hf download {repo_id}{rev} --exclude '*.py'\n"
        f"  (older huggingface_hub: huggingface-cli download {repo_id}{rev} --exclude '*.py')\n"
        "with network access (and HF_HOME / HF_HUB_CACHE set as they will be when loading), or pass a "
        "local directory that holds config.json, the tokenizer files and the weights."
    )


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "adapter_config.json"):
        hit = try_to_load_from_cache(repo_id, name, cache_dir=str(cache_dir), revision=revision)
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def _hub_patterns(files: Iterable[str]) -> list[str]:
    files = set(files)
    if any(re.match(r"(.*/)?global_step\d+/", f) for f in files) and "config.json" not in files:
        raise CheckpointError(
            "this repository is a raw DeepSpeed checkpoint, not a Hugging Face model folder; "
            "consolidate it with DeepSpeed's zero_to_fp32 tool first and pass the resulting directory"
        )
    patterns = list(_META_FILES)
    if "model.safetensors.index.json" in files:
        patterns += ["model.safetensors.index.json", "model-*.safetensors"]
    elif "model.safetensors" in files:
        patterns += ["model.safetensors"]
    elif "pytorch_model.bin.index.json" in files:
        patterns += ["pytorch_model.bin.index.json", "pytorch_model-*.bin"]
    elif "pytorch_model.bin" in files:
        patterns += ["pytorch_model.bin"]
    return patterns


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder holding the checkpoint: the path itself, or the hub snapshot (downloaded
    when allowed: only config, tokenizer and one weight format; never the repository's code)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    entry = lookup(str(name_or_path))
    repo_id = entry.hub_id if entry else str(name_or_path)
    if entry is not None and not entry.loadable:
        raise CheckpointError(f"{entry.name}: {entry.how_to_load}")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id):
        raise FileNotFoundError(f"{name_or_path!r} is neither a local directory, a known checkpoint name "
                                f"({', '.join(CHECKPOINTS)}) nor a Hugging Face hub id (org/name)")
    cache_dir = hub_cache_dir()
    repo_folder = cache_dir / f"models--{repo_id.replace('/', '--')}"
    if hub_offline():
        folder = _cached_snapshot(repo_id, revision, cache_dir)
        if folder is None or not _has_weights(folder):
            raise WeightsNotCached(
                f"the weights of {repo_id!r} are not in the local Hugging Face cache and downloads are "
                f"disabled (HF_HUB_OFFLINE=1).\nThe cache was searched at {repo_folder} "
                f"(from HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).\n"
                f"Download them once with:\n{_download_hint(repo_id, revision)}"
            )
        return folder
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        patterns = _hub_patterns(files)  # config, tokenizer, ONE weight format; never *.py
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir), allow_patterns=patterns))
    except CheckpointError:
        raise
    except Exception as err:  # network down, repo missing, gated...
        folder = _cached_snapshot(repo_id, revision, cache_dir)
        if folder is None or not _has_weights(folder):
            raise WeightsNotCached(
                f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}) and "
                f"the local cache at {repo_folder} does not hold it. Download it with:\n"
                f"{_download_hint(repo_id, revision)}"
            ) from err
    return folder


# ------------------------------------------------------------------------------------------------
# Reading weights
# ------------------------------------------------------------------------------------------------

IGNORED_UNEXPECTED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
OPTIONAL_MISSING = re.compile(r"\.attention\.(q_pos_embed|k_pos_embed)$")


def _file_keys(fmt: str, shards: list[Path], index: Path | None) -> list[str] | None:
    if index is not None:
        return list(json.loads(index.read_text())["weight_map"])
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(shards[0]), framework="pt") as f:
            return list(f.keys())
    return None  # a single pickle: keys known only once loaded


def _read_shard(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    # Pickled shards: weights_only=True ONLY (plain tensors and storages, bf16 included); a
    # pickle asking for anything else (code, arbitrary objects) is refused, never executed.
    import pickle
    import zipfile

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to unpickle {path}: it holds more than plain tensors, and this package only "
            f"reads pickles with torch.load(weights_only=True). Details: {err}"
        ) from err
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
    return sd


def check_keys(expected: Iterable[str], present: Iterable[str], where: str) -> None:
    """Strict key matching; the official extras (inv_freq) and absent position tables pass."""
    expected, present = set(expected), set(present)
    missing = sorted(k for k in expected - present if not OPTIONAL_MISSING.search(k))
    unexpected = sorted(k for k in present - expected if not IGNORED_UNEXPECTED.search(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        raise CheckpointError(f"{where} does not match the mPLUG-Owl2 architecture of its config.json: " + "; ".join(parts))


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype.lower() not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        return names[dtype.lower()]
    return dtype


def _memory_note(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, label: str) -> None:
    n = sum(p.numel() for p in model.parameters())
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < 2**30:
        return
    avail = ""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
        avail = f"; {free / 1e9:.1f} GB available now" + (" -- NOT ENOUGH" if free < nbytes else "")
    except (OSError, KeyError, ValueError):
        pass
    print(
        f"qalign: loading {label} on CPU: {n / 1e9:.2f}B parameters x {torch.empty((), dtype=dtype).element_size()} "
        f"bytes ({str(dtype).replace('torch.', '')}) = about {nbytes / 1e9:.1f} GB of RAM{avail}. "
        "dtype='bfloat16' halves it.",
        file=sys.stderr,
    )


def _build_meta_model(config: MPLUGOwl2Config, attn: str) -> MPLUGOwl2LlamaForCausalLM:
    config._attn_implementation = attn
    with torch.device("meta"):
        model = MPLUGOwl2LlamaForCausalLM(config)
    model.set_attention_implementation(attn)
    return model


def load_config(folder: Path) -> MPLUGOwl2Config:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {folder}")
    data = json.loads(cfg_file.read_text())
    model_type = data.get("model_type")
    if model_type != "mplug_owl2":
        raise CheckpointError(f"{cfg_file} has model_type {model_type!r}, not 'mplug_owl2'")
    data.pop("auto_map", None)  # never run checkpoint code
    return MPLUGOwl2Config.from_dict(data)


def load_owl2_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype=None,
    attn: str = "sdpa",
    *,
    quantization: str | None = None,
    revision: str | None = None,
    base: str | os.PathLike | None = None,
    merge_adapter: bool = True,
) -> tuple[MPLUGOwl2LlamaForCausalLM, Path]:
    """Load the model (eval mode) and return it with the folder holding its tokenizer files.

    ``dtype``: None = float32 on CPU, float16 on CUDA. ``quantization``: None, "8bit" or "4bit"
    (bitsandbytes, CUDA only). ``base``: the base model of a PEFT adapter folder (default: the
    checkpoint table's, else the adapter's ``base_model_name_or_path``).
    """
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn must be 'sdpa' or 'eager', not {attn!r}")
    device = torch.device(device)
    dtype = _resolve_dtype(dtype, device)
    entry = lookup(str(name_or_path)) if not Path(name_or_path).expanduser().is_dir() else None
    folder = resolve_checkpoint(name_or_path, revision)
    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder, entry, device, dtype, attn, quantization, base, merge_adapter)
    if quantization:
        return _load_quantized(folder, device, attn, quantization), folder

    config = load_config(folder)
    fmt, shards, index = weight_files(folder)
    if not shards:
        raise CheckpointError(
            f"no weights in {folder}: expected model.safetensors, model-*-of-*.safetensors + "
            "model.safetensors.index.json, or pytorch_model-*-of-*.bin + pytorch_model.bin.index.json"
        )
    model = _build_meta_model(config, attn)
    expected = model.state_dict()
    _memory_note(model, dtype, device, str(name_or_path))

    keys = _file_keys(fmt, shards, index)
    if keys is not None:
        check_keys(expected, keys, str(index or shards[0]))
    seen: set[str] = set()
    for shard in shards:
        sd = _read_shard(shard, fmt)
        seen.update(sd)
        if keys is None:
            check_keys(expected, sd, str(shard))
        if index is not None:  # the index must be honest about which shard holds what
            stray = sorted(set(sd) - set(keys))
            if stray:
                raise CheckpointError(f"{shard} holds keys its index does not list: {', '.join(stray[:10])}")
        ready = {}
        for k, t in sd.items():
            if k not in expected:
                continue  # ignorable extras (inv_freq)
            if tuple(t.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{k}: shape {tuple(t.shape)} in {shard.name}, expected {tuple(expected[k].shape)}")
            ready[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        model.load_state_dict(ready, strict=False, assign=True)
        del sd, ready
    if keys is not None:
        missing_from_shards = sorted(set(keys) - seen)
        if missing_from_shards:
            raise CheckpointError(f"the index lists keys no shard holds: {', '.join(missing_from_shards[:10])}")

    for module in model.modules():  # position tables absent from the file: the formula
        if isinstance(module, MPLUGOwl2AbstractorAttention):
            module.fill_missing_position_tables(device=device, dtype=dtype)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"not loaded: {', '.join(still_meta[:10])}")
    model.eval()
    model.requires_grad_(False)
    return model, folder


def _load_quantized(folder: Path, device: torch.device, attn: str, quantization: str) -> MPLUGOwl2LlamaForCausalLM:
    """bitsandbytes 8/4-bit through transformers' loader (CUDA only); vision tower, abstractor and
    lm_head stay in float16."""
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"quantization must be '8bit' or '4bit', not {quantization!r}")
    if not torch.cuda.is_available() or device.type != "cuda":
        raise RuntimeError("bitsandbytes 8/4-bit loading needs a CUDA device (device='cuda')")
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", "vision_model", "visual_abstractor"]
    if quantization == "8bit":
        qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16,
                                  bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
    config = load_config(folder)
    config._attn_implementation = attn
    model, info = MPLUGOwl2LlamaForCausalLM.from_pretrained(
        str(folder), config=config, dtype=torch.float16, quantization_config=qcfg,
        device_map={"": device.index or 0}, attn_implementation=attn, output_loading_info=True,
    )
    bad_missing = [k for k in info.get("missing_keys", []) if not OPTIONAL_MISSING.search(k)]
    bad_unexpected = [k for k in info.get("unexpected_keys", []) if not IGNORED_UNEXPECTED.search(k)]
    if bad_missing or bad_unexpected:
        raise CheckpointError(f"{folder}: missing keys {bad_missing[:20]}, unexpected keys {bad_unexpected[:20]}")
    model.set_attention_implementation(attn)
    model.eval()
    return model


def _strip_peft_prefix(key: str) -> str:
    while key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    return key


def _load_adapter(folder, entry, device, dtype, attn, quantization, base, merge):
    adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
    candidates = [base, entry.base if entry else None, adapter_cfg.get("base_model_name_or_path")]
    base_ref = next((c for c in candidates if c), None)
    if base_ref is None:
        raise CheckpointError(f"{folder} is a PEFT adapter without a base model; pass base=<dir or hub id>")
    model, base_folder = load_owl2_model(base_ref, device, dtype, attn, quantization=quantization)
    extra = folder / "non_lora_trainables.bin"
    if extra.is_file():  # the trained abstractor etc. of LLaVA-style LoRA runs
        trainables = {_strip_peft_prefix(k): v for k, v in _read_shard(extra, "bin").items()}
        own = model.state_dict()
        unknown = sorted(set(trainables) - set(own))
        if unknown:
            raise CheckpointError(f"{extra} holds keys the model does not have: {', '.join(unknown[:20])}")
        with torch.no_grad():
            for k, v in trainables.items():
                own[k].copy_(v.to(own[k].dtype))
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError(f"{folder} is a PEFT (LoRA) adapter: loading it needs the peft package (pip install peft)") from err

    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    model = peft_model.merge_and_unload() if merge else peft_model
    model.eval()
    tokenizer_folder = folder if (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file() else base_folder
    return model, tokenizer_folder


# ------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------


class Owl2Backend(Backend):
    """Official mPLUG-Owl2 scorer: items [F, 3, 448, 448] -> five level logits (bad..excellent)."""

    def __init__(self, model, tokenizer, info: ModelInfo, *, frames_per_chunk: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype if first.is_floating_point() else torch.float16
        base = getattr(model, "model", model)
        if hasattr(base, "vision_batch_size"):
            base.vision_batch_size = frames_per_chunk
        self.level_ids = level_token_ids(tokenizer)  # bad, poor, fair, good, excellent
        self._prompts: dict[tuple[str, str], list[int]] = {}
        # The text before the image is the same for every item: its keys/values are computed
        # once per (task, input kind) and reused (False: the whole prompt every time).
        self.prefix_cache = True
        self._prefix_kv: dict[tuple[str, str], tuple] = {}

    def preprocess(self, image) -> torch.Tensor:
        return preprocess_image(image)

    def prompt_ids(self, task: str = "quality", input_kind: str = "image") -> list[int]:
        key = (task, input_kind)
        if key not in self._prompts:
            self._prompts[key] = prompt_ids(self.tokenizer, task, input_kind)
        return self._prompts[key]

    def level_logits(self, items: Sequence, task: str = "quality", input_kind: str = "image") -> torch.Tensor:
        self.check_task(task, input_kind)
        if len(items) == 0:
            return torch.empty(0, len(LEVELS), dtype=torch.float32)
        frames = [torch.as_tensor(x) for x in items]
        frames = [x[None] if x.dim() == 3 else x for x in frames]
        for x in frames:
            if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < 1:
                raise ValueError(f"each item must be [F, 3, H, W] with F >= 1, got {tuple(x.shape)}")
        prompt = self.prompt_ids(task, input_kind)
        cut = prompt.index(IMAGE_TOKEN_INDEX)
        past = self._prefix(task, input_kind, prompt[:cut]) if self.prefix_cache and cut > 0 and hasattr(self.model.model, "prefix_kv") else None
        rest = prompt[cut:] if past is not None else prompt
        ids = torch.tensor([rest] * len(frames), device=self.device)
        with torch.inference_mode():
            pixels = [x.to(self.device, dtype=self.dtype) for x in frames]
            if past is None:
                out = self.model.level_logits(ids, self.level_ids, pixel_values=pixels)
            else:
                out = self.model.level_logits(ids, self.level_ids, pixel_values=pixels, past=past)
        return out.float().cpu()

    def _prefix(self, task: str, input_kind: str, prefix: list[int]):
        key = (task, input_kind)
        if key not in self._prefix_kv:
            with torch.inference_mode():
                self._prefix_kv[key] = self.model.model.prefix_kv(torch.tensor(prefix, device=self.device))
        return self._prefix_kv[key]


def _info_for(entry: Owl2Checkpoint | None, label: str, tasks=None, video=None) -> ModelInfo:
    if entry is not None:
        return ModelInfo(
            name=entry.name, tasks=tuple(tasks or entry.tasks), video=video or entry.video,
            description=f"{entry.hub_id}: {entry.notes}",
        )
    return ModelInfo(
        name=label, tasks=tuple(tasks or ("quality", "aesthetics")), video=video or "native",
        description=f"mPLUG-Owl2 checkpoint {label} (not in the known-checkpoint table: tasks unchecked)",
    )


def load_owl2(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype=None,
    attn: str = "sdpa",
    *,
    quantization: str | None = None,
    revision: str | None = None,
    base: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    video: str | None = None,
) -> Owl2Backend:
    """An :class:`Owl2Backend` for a known name ("one-align"), a hub id or a local directory."""
    is_dir = Path(name_or_path).expanduser().is_dir()
    entry = None if is_dir else lookup(str(name_or_path))
    model, tok_folder = load_owl2_model(
        name_or_path, device, dtype, attn, quantization=quantization, revision=revision, base=base
    )
    tokenizer = load_tokenizer(tok_folder)
    label = entry.name if entry else str(name_or_path)
    return Owl2Backend(model, tokenizer, _info_for(entry, label, tasks, video))


__all__ = [
    "CheckpointError",
    "Owl2Backend",
    "WeightsNotCached",
    "check_keys",
    "expand_to_square",
    "hub_cache_dir",
    "level_token_ids",
    "load_owl2",
    "load_owl2_model",
    "load_tokenizer",
    "preprocess_image",
    "prompt_ids",
    "read_sentencepiece_model",
    "resolve_checkpoint",
]
