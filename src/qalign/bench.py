"""`qalign bench`: scoring speed against the straightforward way and against the machine's limit.

In one run, on the same decoded images:

(a) straightforward: the whole prompt through the model for every image, full-vocabulary logits at
    every position, batch 1, no cache (what a first implementation does; ``straightforward_logits``);
(b) qalign's optimised path (``backend.level_logits``) at batch 1;
(c) the optimised path at each batch size (1, 4, 8, 16, 32), the best one kept;
(d) the whole Scorer (JPEG files -> decode threads -> model) at that batch size, with the share of
    the wall time the model was busy: does decoding keep up?

For each: images/s, ms/image, peak memory (CPU: the process's peak RSS, reset per phase through
/proc/self/clear_refs; GPU: torch.cuda.max_memory_allocated), FLOPs per image (counted with
torch.utils.flop_counter on one image: vision encoder, abstractor and the LLM tokens actually
processed) and achieved FLOP/s against the peak matmul FLOP/s measured in the same run (a large
float32 matmul, and bfloat16 where the device runs it). Scores of (a), (b), (c) are compared.
With CUDA, the full-size mPLUG-Owl2 graph (random weights, fp16) is measured the same way.

The last line printed is ``speedup: X.XX`` = best optimised images/s / straightforward images/s.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "data" / "pristine"
BATCH_SIZES = (1, 4, 8, 16, 32)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


# --------------------------------------------------------------------------- the reference path

def straightforward_logits(backend, pixels, task: str = "quality"):
    """Five level logits of ONE image the naive way: the model's own ``forward`` over the whole
    prompt (no cache), full-vocabulary logits at every position, then the five level columns of
    the last position. ``pixels``: [1, 3, H, W]. Returns float32 [5] on the CPU."""
    import torch

    from .models.tiny.backend import TinyBackend

    with torch.no_grad():
        if isinstance(backend, TinyBackend):
            ids = torch.tensor(backend.prompter.prompt_ids(task, "image"), device=backend.device)
            with backend._autocast():  # the same precision policy as the optimised path (GPU: bf16 autocast)
                out = backend.model(input_ids=[ids], pixel_values=pixels.to(backend.device, backend.dtype))
            level_ids = backend.prompter.level_ids
        elif hasattr(backend, "prompt_ids") and hasattr(backend, "level_ids"):  # Owl2Backend
            ids = torch.tensor([backend.prompt_ids(task, "image")], device=backend.device)
            out = backend.model(ids, pixel_values=pixels.to(backend.device, backend.dtype))
            level_ids = backend.level_ids
        else:
            raise TypeError(f"no straightforward reference for {type(backend).__name__}")
        return out.logits[0, -1, level_ids].float().cpu()


def optimised_logits(backend, batch: Sequence, task: str = "quality"):
    """The optimised path: what the Scorer calls. ``batch``: [1, 3, H, W] tensors."""
    return backend.level_logits(list(batch), task=task, input_kind="image")


# --------------------------------------------------------------------------- measuring

@dataclass
class Result:
    label: str
    batch: int
    seconds: float
    images: int
    peak_bytes: int | None
    flops_per_image: float | None = None
    max_score_diff: float | None = None
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass
class Report:
    machine: str
    model: str
    images: str
    peaks: dict[str, float] = field(default_factory=dict)  # dtype -> FLOP/s
    compute_dtype: str = "float32"  # what the model's matmuls run in: the peak to compare with
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: list["Report"] = field(default_factory=list)

    def straightforward(self) -> Result:
        return next(r for r in self.results if r.label.startswith("(a)"))

    def best(self) -> Result:
        return max((r for r in self.results if r.label.startswith(("(b)", "(c)"))), key=lambda r: r.images_per_s)

    @property
    def speedup(self) -> float:
        return self.best().images_per_s / self.straightforward().images_per_s


class MemoryMeter:
    """Peak memory of a phase: CUDA's allocator peak, or the process's peak RSS (VmHWM), whose
    mark is reset to the current RSS at the start of each phase (/proc/self/clear_refs "5")."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.note = ""

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.note = "peak RSS since process start (could not reset /proc/self/clear_refs)"

    def peak(self) -> int | None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


def _sync(device) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call, from torch's FLOP counter (matmuls, convolutions, attention)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def fused_conv(*args, out_shape=None, **kwargs) -> int:
        # mkldnn::_convolution_pointwise(X, W, B, ...) or its .binary(X, other, W, B, ...)
        x_shape, w_shape = args[0], (args[2] if len(args) > 10 else args[1])
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # the CPU SDPA kernel, not in torch's table
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if mkldnn is not None and hasattr(mkldnn, "_convolution_pointwise"):  # oneDNN convs with fused ReLU6 / add
        mapping[mkldnn._convolution_pointwise] = fused_conv
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    return float(counter.get_total_flops())


def peak_matmul_flops(device, dtype, n: int | None = None, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul (best of several), the practical compute limit."""
    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"
    n = n or (8192 if cuda else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t = timed(lambda: torch.matmul(a, b), device)
        best, spent = min(best, t), spent + t
        if spent > 4 * seconds:
            break
    return 2.0 * n**3 / best


# --------------------------------------------------------------------------- inputs

def find_images(folder: str | os.PathLike | None, count: int) -> tuple[list, str]:
    """``count`` PIL images from ``folder`` (sorted, cycled when fewer), else generated ones."""
    from PIL import Image

    folder = Path(folder) if folder else DEFAULT_IMAGES
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if files:
        picked = [files[i % len(files)] for i in range(count)]
        images = [Image.open(p).convert("RGB") for p in picked]
        return images, f"{len(picked)} images from {folder}" + (" (cycled)" if count > len(files) else "")
    return [generated_image(i) for i in range(count)], f"{count} generated 768x512 images ({folder} not found)"


def generated_image(index: int, size: tuple[int, int] = (768, 512)):
    """A deterministic photo-like test image (smooth gradients, texture, edges)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(index)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(x / (20 + 7 * c) + index) * np.cos(y / (30 + 5 * c)) for c in range(3)], -1)
    arr = 127 + 80 * base + rng.normal(0, 6 + index % 9, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img.filter(ImageFilter.GaussianBlur(index % 3)) if index % 2 else img


# --------------------------------------------------------------------------- models

def load_bench_backend(model: str, device: str):
    """(backend, description). qalign-tiny without its trained weights yet: the real bases with an
    untrained abstractor (the same graph and FLOPs; the scores are meaningless)."""
    from .models.registry import load_backend
    from .models.tiny import backend as tiny

    if model == "qalign-tiny" and not (tiny.SHIPPED_DIR / tiny.TRAINED_FILE).exists():
        model_obj = tiny.assemble(tiny.base_config())
        backend = tiny.TinyBackend(model_obj, tiny._tokenizer(), device=device, name="qalign-tiny")
        return backend, ("qalign-tiny graph: pretrained bases + UNTRAINED abstractor (trained weights not in "
                         f"{tiny.SHIPPED_DIR} yet; same compute, scores meaningless)")
    backend = load_backend(model, device=device)
    return backend, model


def machine_description(device) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    text = (f"{cpu}, {os.cpu_count()} cores ({usable} usable){mem}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")
    if getattr(device, "type", str(device)) == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU {props.name}, {props.total_memory / 2**30:.0f} GiB"
    return text


# --------------------------------------------------------------------------- the benchmark

def _scores(logits) -> np.ndarray:
    from .levels import logits_to_scores

    return logits_to_scores(np.asarray(logits, dtype=np.float64))[1]


def bench_backend(backend, pixels: list, task: str = "quality", batch_sizes: Sequence[int] = BATCH_SIZES,
                  repeats: int = 1, log: Callable[[str], None] = lambda s: None) -> list[Result]:
    """(a), (b), (c) on ``pixels`` (preprocessed [1, 3, H, W] tensors) with one backend."""
    import torch

    device = backend.device
    backend.model.requires_grad_(False)  # inference only (and torch's FLOP counter wants it)
    meter = MemoryMeter(device)
    n = len(pixels)
    results: list[Result] = []

    # (a) straightforward, batch 1
    log("(a) straightforward ...")
    straightforward_logits(backend, pixels[0], task)
    ref: list = []

    def run_a():
        ref.clear()
        ref.extend(straightforward_logits(backend, x, task) for x in pixels)

    meter.start()
    t = timed(run_a, device, repeats)
    ref_scores = _scores(torch.stack(ref))
    flops_a = count_flops(lambda: straightforward_logits(backend, pixels[0], task))
    results.append(Result("(a) straightforward: full logits, no cache", 1, t, n, meter.peak(), flops_a, 0.0))

    # (b) and (c): the optimised path
    optimised_logits(backend, pixels[:1], task)  # builds the prefix cache and the folded vision once
    flops_b = count_flops(lambda: optimised_logits(backend, pixels[:1], task))
    for bs in sorted(set(b for b in batch_sizes if b <= n) | {1}):
        log(f"(c) optimised, batch {bs} ...")
        chunks = [pixels[i:i + bs] for i in range(0, n, bs)]
        optimised_logits(backend, chunks[0], task)  # warm-up at this shape
        out: list = []

        def run(chunks=chunks, out=out):
            out.clear()
            out.extend(optimised_logits(backend, c, task) for c in chunks)

        meter.start()
        t = timed(run, device, repeats)
        diff = float(np.max(np.abs(_scores(torch.cat(out)) - ref_scores)))
        label = "(b) optimised, batch 1" if bs == 1 else f"(c) optimised, batch {bs}"
        results.append(Result(label, bs, t, n, meter.peak(), flops_b, diff))
    return results


def bench_pipeline(backend, images: list, batch_size: int, task: str = "quality", workers: int | None = None,
                   lookahead_factor: int = 2) -> tuple[Result, float, float]:
    """(d) the Scorer end to end on JPEG files: (result, share of wall time inside the model,
    decode+preprocess seconds per image on one thread)."""
    from .scoring import Scorer

    meter = MemoryMeter(backend.device)
    with tempfile.TemporaryDirectory(prefix="qalign-bench-") as tmp:
        paths = []
        for i, img in enumerate(images):
            path = Path(tmp) / f"img_{i:04d}.jpg"
            img.save(path, quality=92)
            paths.append(str(path))
        scorer = Scorer(backend, batch_size=batch_size, workers=workers)
        if lookahead_factor != 2:  # measuring what more lookahead would give
            original = scorer._prepare_ahead
            scorer._prepare_ahead = lambda inputs, lookahead: original(inputs, lookahead // 2 * lookahead_factor)
        busy = [0.0]
        inner = backend.level_logits

        def timed_level_logits(*args, **kwargs):
            _sync(backend.device)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                _sync(backend.device)
                busy[0] += time.perf_counter() - start

        scorer.score(paths[:batch_size], task=task)  # warm-up
        start = time.perf_counter()
        for p in paths[: min(8, len(paths))]:
            scorer._prepare(p, 0)
        decode = (time.perf_counter() - start) / min(8, len(paths))
        backend.level_logits = timed_level_logits
        try:
            meter.start()
            start = time.perf_counter()
            rows = scorer.score(paths, task=task)
            wall = time.perf_counter() - start
        finally:
            del backend.level_logits  # the instance attribute; the method is back
        bad = [r.error for r in rows if r.error]
        if bad:
            raise RuntimeError(f"pipeline run failed: {bad[0]}")
    label = f"(d) Scorer on JPEG files ({scorer.workers} decode threads, lookahead {lookahead_factor}x batch)"
    return Result(label, batch_size, wall, len(paths), meter.peak()), busy[0] / wall, decode


def run(images: str | None = None, count: int = 32, model: str = "qalign-tiny", device: str = "cpu",
        task: str = "quality", batch_sizes: Sequence[int] = BATCH_SIZES, repeats: int = 1, pipeline: bool = True,
        owl2: bool = True, log: Callable[[str], None] = lambda s: None) -> Report:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    backend, description = load_bench_backend(model, str(dev))
    pil_images, source = find_images(images, count)
    pixels = [backend.preprocess(img)[None] for img in pil_images]
    precision = _dtype_name(backend.dtype)
    if getattr(backend, "autocast_dtype", None) is not None:
        precision += f" weights, {_dtype_name(backend.autocast_dtype)} autocast"
    report = Report(machine_description(dev), f"{description} on {dev.type}, {precision}", source)
    log("peak matmul ...")
    report.compute_dtype = _dtype_name(getattr(backend, "autocast_dtype", None) or backend.dtype)
    report.peaks["float32"] = peak_matmul_flops(dev, torch.float32)
    if dev.type == "cuda" or _cpu_has_bf16():
        report.peaks["bfloat16"] = peak_matmul_flops(dev, torch.bfloat16)
    if dev.type == "cuda":
        report.peaks["float16"] = peak_matmul_flops(dev, torch.float16)
    report.results = bench_backend(backend, pixels, task, batch_sizes, repeats, log)
    if pipeline:
        best = report.best()
        log(f"(d) pipeline at batch {best.batch} ...")
        for factor in (2, 4):
            result, busy, decode = bench_pipeline(backend, pil_images, best.batch, task, lookahead_factor=factor)
            result.note = (f"(d) lookahead {factor}x batch: model busy {100 * busy:.0f}% of the wall time; "
                           f"decode+preprocess {1e3 * decode:.0f} ms/image on one thread")
            report.results.append(result)
    if owl2:
        if dev.type == "cuda":
            log("owl2 full size ...")
            extra = bench_owl2_random(dev, count=min(count, 16), batch_sizes=batch_sizes, repeats=repeats)
            extra.peaks = report.peaks
            report.extra.append(extra)
        else:
            report.notes.append("full-size mPLUG-Owl2 (random weights): skipped, no CUDA device in this run "
                                "(run `qalign bench --device cuda` on a GPU machine)")
    return report


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def owl2_random_backend(device, dtype=None, config=None, tokenizer_dir: str | os.PathLike | None = None):
    """An Owl2Backend on a RANDOM-weight mPLUG-Owl2 (full size unless ``config``) for timing only;
    the LLaMA tokenizer from the owl2 reference fixture (or ``tokenizer_dir``)."""
    import torch

    from .models.base import ModelInfo
    from .models.owl2 import MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM
    from .models.owl2.backend import Owl2Backend, load_tokenizer

    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else REPO_ROOT.parent / "shared" / "data" / "owl2-reference" / "tiny_ckpt"
    dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    config = config or MPLUGOwl2Config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = MPLUGOwl2LlamaForCausalLM(config)
    model.to(dtype).eval().requires_grad_(False)
    info = ModelInfo(name="mplug-owl2 (random weights)", tasks=("quality", "aesthetics"), video="native")
    return Owl2Backend(model, load_tokenizer(tokenizer_dir), info)


def bench_owl2_random(device, count: int = 16, batch_sizes: Sequence[int] = BATCH_SIZES, repeats: int = 1,
                      config=None, tokenizer_dir=None) -> Report:
    import torch

    backend = owl2_random_backend(device, config=config, tokenizer_dir=tokenizer_dir)
    size = 448 if config is None else config.vision_settings.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = [torch.randn(1, 3, size, size, generator=gen) for _ in range(count)]
    report = Report(machine_description(device), f"mPLUG-Owl2 {'full size' if config is None else 'custom'} "
                    f"(random weights) on {backend.device}, {_dtype_name(backend.dtype)}",
                    f"{count} random {size}x{size} tensors", compute_dtype=_dtype_name(backend.dtype))
    report.results = bench_backend(backend, pixels, "quality", batch_sizes, repeats)
    return report


# --------------------------------------------------------------------------- printing

def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def format_report(report: Report) -> str:
    lines = [f"model: {report.model}", f"images: {report.images}", f"machine: {report.machine}"]
    if report.peaks:
        lines.append("peak matmul (measured now): " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in report.peaks.items()))
    peak = report.peaks.get(report.compute_dtype) or report.peaks.get("float32")
    peak_name = report.compute_dtype if report.compute_dtype in report.peaks else "float32"
    head = ["path", "batch", "images/s", "ms/image", "peak mem", "GFLOP/img", "GFLOP/s", f"% {peak_name} peak",
            "max |dscore|"]
    body = []
    for r in report.results:
        achieved = r.flops_per_image * r.images_per_s if r.flops_per_image else None
        body.append([
            r.label, str(r.batch), f"{r.images_per_s:.2f}", f"{1e3 / r.images_per_s:.1f}", _fmt_bytes(r.peak_bytes),
            "-" if r.flops_per_image is None else f"{r.flops_per_image / 1e9:.2f}",
            "-" if achieved is None else f"{achieved / 1e9:.1f}",
            "-" if achieved is None or not peak else f"{100 * achieved / peak:.1f}%",
            "-" if r.max_score_diff is None else f"{r.max_score_diff:.1e}",
        ])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    lines += [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
    lines += [f"  {r.note}" for r in report.results if r.note]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def print_report(report: Report, out=print) -> None:
    out(format_report(report))
    for extra in report.extra:
        out("")
        out(format_report(extra))
        out(f"owl2 speedup: {extra.speedup:.2f}")
    best = report.best()
    out(f"best: {best.label} ({best.images_per_s:.2f} images/s) vs straightforward "
        f"({report.straightforward().images_per_s:.2f} images/s)")
    out(f"speedup: {report.speedup:.2f}")


@contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
