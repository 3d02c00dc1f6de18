"""`qalign train` in 2 CPU processes (DDP over gloo), launched the way configs/README.md says:
``accelerate launch --config_file configs/accelerate_cpu_2proc.yaml -m qalign train ...``.

Each process trains on its half of every global batch; DDP averages the gradients, so both end
with the same weights (training checks that and records each process's checksum). The main
process writes a model that ``qalign.load`` reads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import write_corpus

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "accelerate_cpu_2proc.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_launch() -> list[str]:
    script = Path(sys.executable).with_name("accelerate")
    return [str(script), "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def test_two_cpu_processes_train_in_step_and_write_a_loadable_model(tmp_path):
    import qalign
    from tiny_model import build_tiny_folder

    model_dir = build_tiny_folder(tmp_path / "tiny")
    labels = write_corpus(tmp_path / "corpus", n=60)
    out = tmp_path / "out"
    assert CONFIG.is_file()
    cmd = [*_accelerate_launch(), "--config_file", str(CONFIG), "--main_process_port", str(_free_port()), "-m", "qalign", "train", "--data", str(labels),
           "--model", str(model_dir), "--output", str(out), "--epochs", "2", "--batch-size", "4", "--lr", "2e-3",
           "--mixed-precision", "no", "--save-every", "5", "--log-every", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    doc = json.loads((out / "training.json").read_text())
    assert doc["processes"] == 2
    # 45 train items, global batch 2 x 4 = 8 -> 6 steps per epoch (not 12: the processes share the data)
    assert doc["steps_per_epoch"] == 6 and doc["steps"] == 12
    sums = doc["rank_checksums"]
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=1e-9)
    assert [h["step"] for h in doc["history"]] == [6, 12] and all(np.isfinite(h["srcc"]) for h in doc["history"])
    assert (out / "checkpoint" / "trainer.json").exists()
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["processes"] == 2

    scorer = qalign.load(str(out), device="cpu", batch_size=4)
    images = sorted(str(p) for p in (tmp_path / "corpus" / "images").glob("*.png"))[:6]
    scores = [r.score for r in scorer.score(images)]
    assert all(1.0 <= s <= 5.0 for s in scores) and np.std(scores) > 0
    # Training changed the model: the abstractor differs from the starting folder's.
    from safetensors.torch import load_file

    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    key = "visual_abstractor.feature_proj.weight"
    assert not np.array_equal(before[key].numpy(), after[key].numpy())


@pytest.mark.parametrize("name, kind, extra", [
    ("accelerate_cpu_2proc", "MULTI_GPU", {}),
    ("deepspeed_zero3", "DEEPSPEED", {"zero_stage": 3, "zero3_init_flag": False}),
    ("fsdp", "FSDP", {"fsdp_use_orig_params": True, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}),
])
def test_configs_are_valid_accelerate_files(name, kind, extra):
    """accelerate's own loader reads each config (it rejects unknown keys); the settings the
    training code relies on are there. (DeepSpeed and FSDP are not run here: no GPU.)"""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / f"{name}.yaml"))
    assert str(cfg.distributed_type).split(".")[-1] == kind
    section = cfg.deepspeed_config if kind == "DEEPSPEED" else cfg.fsdp_config if kind == "FSDP" else {}
    for key, value in extra.items():
        assert section[key] == value, key
    if kind == "MULTI_GPU":
        assert cfg.num_processes == 2 and not cfg.use_cpu
    assert f"configs/{name}.yaml" in (ROOT / "configs" / "README.md").read_text()
