"""The released mPLUG-Owl2 scoring checkpoints, by the names users know (no heavy imports: `qalign models` reads it).

Every entry runs on the same native model (``modeling_mplug_owl2``); they differ in what they
were trained on. ``tasks`` is what the checkpoint was trained to rate; ``video`` is "native" when
it was trained on videos (all frames spliced into one prompt) and "per-frame" otherwise (a video
is then best scored frame by frame, averaging the level logits).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Owl2Checkpoint:
    name: str
    hub_id: str
    tasks: tuple[str, ...]
    video: str  # "native" | "per-frame"
    notes: str
    base: str | None = None  # for adapters: the hub id of the base model
    loadable: bool = True  # False: the hub folder is not in a format this package reads
    how_to_load: str = ""

    @property
    def description(self) -> str:
        return self.notes


_ONE_ALIGN_NOTE = (
    "OneAlign: one model for image quality, image aesthetics and video quality (KonIQ, SPAQ, KADID, "
    "AVA, LSVQ). 16.4 GB of bf16 pickled shards on the main branch, read with weights_only=True "
    "(a safetensors copy exists only on the bot branch refs/pr/5)."
)

CHECKPOINTS: dict[str, Owl2Checkpoint] = {
    c.name: c
    for c in (
        Owl2Checkpoint("one-align", "q-future/one-align", ("quality", "aesthetics"), "native", _ONE_ALIGN_NOTE),
        Owl2Checkpoint(
            "q-align-quality",
            "q-future/q-align-quality",
            ("quality",),
            "native",
            "Q-Align trained on image quality (KonIQ, SPAQ, KADID) and video quality (LSVQ).",
        ),
        Owl2Checkpoint(
            "q-align-image",
            "q-future/q-align-image",
            ("quality", "aesthetics"),
            "per-frame",
            "Q-Align trained on image quality and image aesthetics (IQA + IAA); not trained on video.",
        ),
        Owl2Checkpoint(
            "q-align-aesthetic",
            "q-future/q-align-aesthetic",
            ("aesthetics",),
            "per-frame",
            "Q-Align trained on image aesthetics only (AVA).",
        ),
        Owl2Checkpoint(
            "q-align-vqa",
            "q-future/q-align-vqa",
            ("quality",),
            "native",
            "Q-Align trained on video quality only (LSVQ); images are scored as 1-frame videos work too.",
        ),
        Owl2Checkpoint(
            "q-align-iqa",
            "q-future/q-align-iqa",
            ("quality",),
            "per-frame",
            "Q-Align trained on image quality only (KonIQ).",
            loadable=False,
            how_to_load=(
                "the hub folder q-future/q-align-iqa is a raw DeepSpeed checkpoint (global_step376 with "
                "ZeRO partitions and zero_to_fp32.py), not a Hugging Face model folder. Consolidate it "
                "yourself with DeepSpeed's own zero_to_fp32 tool (this package never runs checkpoint "
                "code), save the result as model.safetensors (or pytorch_model.bin) next to a config.json "
                "and the tokenizer files of q-future/one-align, and pass that directory instead"
            ),
        ),
        Owl2Checkpoint(
            "deqa-score",
            "zhiyuanyou/DeQA-Score-Mix3",
            ("quality",),
            "per-frame",
            "DeQA-Score (CVPR 2025): soft-label (score distribution) training on KonIQ + SPAQ + KADID; "
            "full fine-tune of mPLUG-Owl2.",
        ),
        Owl2Checkpoint(
            "deqa-score-lora",
            "zhiyuanyou/DeQA-Score-LoRA-Mix3",
            ("quality",),
            "per-frame",
            "DeQA-Score LoRA variant (KonIQ + SPAQ + KADID): a PEFT adapter (plus the trained "
            "abstractor in non_lora_trainables.bin when present) applied to the base model and merged.",
            base="MAGAer13/mplug-owl2-llama2-7b",
        ),
    )
}

# Lower-case aliases users type.
ALIASES = {
    "onealign": "one-align",
    "q-align": "one-align",
    "qalign-onealign": "one-align",
    "deqa": "deqa-score",
    "deqa-score-mix3": "deqa-score",
    "deqa-lora": "deqa-score-lora",
}


def lookup(name_or_id: str) -> Owl2Checkpoint | None:
    """The table entry for a known name, alias or hub id (case-insensitive); None otherwise."""
    key = name_or_id.strip().lower()
    key = ALIASES.get(key, key)
    if key in CHECKPOINTS:
        return CHECKPOINTS[key]
    for c in CHECKPOINTS.values():
        if c.hub_id.lower() == key:
            return c
    return None


__all__ = ["ALIASES", "CHECKPOINTS", "Owl2Checkpoint", "lookup"]
