"""qalign-tiny's input modes (squash / crop) and the abstractor alignment stage of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qalign.models.tiny.backend import preprocess_image
from qalign.models.tiny.configuration_qalign_tiny import QAlignTinyConfig


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 128.0 + 127.0).round().to(torch.int64).permute(1, 2, 0).numpy()


def test_crop_does_not_resample_when_the_short_side_already_fits():
    """KADID-sized 512 x 384 with size 384: the output is exactly the centre 384 x 384 pixels."""
    image = _noise_image(512, 384)
    out = preprocess_image(image, 384, "crop")
    assert out.shape == (3, 384, 384)
    assert np.array_equal(_to_uint8(out), np.asarray(image)[:, 64:448])
    # Squash resamples the same picture: pixel noise is smoothed away, so it must differ.
    assert not np.array_equal(_to_uint8(preprocess_image(image, 384, "squash")), np.asarray(image)[:, 64:448])


@pytest.mark.parametrize("size", [(1000, 500), (300, 900), (64, 64), (50, 40)])
def test_crop_gives_a_square_of_the_model_size_for_any_shape(size):
    out = preprocess_image(_noise_image(*size), 96, "crop")
    assert out.shape == (3, 96, 96)
    assert float(out.min()) >= -127 / 128 - 1e-6 and float(out.max()) <= 1.0


def test_crop_keeps_the_centre():
    """A portrait picture whose top and bottom thirds are black: the crop sees only the white middle."""
    arr = np.zeros((300, 100, 3), dtype=np.uint8)
    arr[100:200] = 255
    out = _to_uint8(preprocess_image(Image.fromarray(arr), 100, "crop"))
    assert out.min() == 255


def test_resize_mode_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="resize"):
        QAlignTinyConfig(resize="stretch")
    with pytest.raises(ValueError, match="resize"):
        preprocess_image(_noise_image(10, 10), 8, "stretch")
    QAlignTinyConfig(resize="crop").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["resize"] == "crop"
    assert QAlignTinyConfig.from_pretrained(tmp_path).resize == "crop"


def test_configs_saved_before_the_option_keep_squashing(tmp_path):
    QAlignTinyConfig().save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc.pop("resize")
    (tmp_path / "config.json").write_text(json.dumps(doc))
    assert QAlignTinyConfig.from_pretrained(tmp_path).resize == "squash"


def test_the_backend_preprocesses_with_its_config_mode(tiny_model_dir):
    import qalign

    scorer = qalign.load(str(tiny_model_dir), device="cpu")
    backend = scorer.backend
    image = _noise_image(90, 64)
    size = backend.image_size
    backend.model.config.resize = "crop"
    assert torch.equal(backend.preprocess(image), preprocess_image(image, size, "crop"))
    backend.model.config.resize = "squash"
    assert torch.equal(backend.preprocess(image), preprocess_image(image, size, "squash"))


# --------------------------------------------------------------------------------------------- alignment stage

def test_align_stage_teaches_the_abstractor_to_read_the_score(tiny_model_dir):
    """Features where 64 of the channels carry the score: after the alignment stage, the readout
    it returns ranks held-out items well through the trained abstractor."""
    from scipy import stats

    from qalign.train import Record, TrainConfig, align_abstractor, unit_targets

    config = QAlignTinyConfig.from_pretrained(tiny_model_dir)
    from qalign.models.tiny.modeling_qalign_tiny import VisualAbstractor

    torch.manual_seed(0)
    abstractor = VisualAbstractor(config)
    n, tokens, channels = 240, config.grid_size ** 2, sum(config.vision_feature_channels)
    rng = np.random.default_rng(0)
    score = rng.uniform(1, 5, n)
    feats = torch.from_numpy(rng.normal(0, 1, (n, tokens, channels)).astype(np.float32))
    feats[:, :, :64] += torch.from_numpy(score.astype(np.float32))[:, None, None]
    records = [Record(f"x{i}", float(s), None, "train" if i < 180 else "test") for i, s in enumerate(score)]
    targets = unit_targets(records, {0: (1.0, 5.0)}, lower_is_better=False)
    assert targets.min() >= 0 and targets.max() <= 1
    assert unit_targets(records, {0: (1.0, 5.0)}, lower_is_better=True) == pytest.approx(1 - targets, abs=1e-6)

    before = [p.detach().clone() for p in abstractor.parameters()]
    cfg = TrainConfig(data="unused", output="unused", batch_size=16, align_epochs=30, align_lr=2e-3, log_every=10_000)
    readout = align_abstractor(abstractor, feats, [list(range(180))], [1.0], targets, cfg, lambda msg: None)
    assert any(not torch.equal(a, b) for a, b in zip(before, abstractor.parameters()))
    assert all(p.grad is None for p in abstractor.parameters())
    with torch.no_grad():
        pred = readout(abstractor(feats[180:]).flatten(1)).squeeze(1).numpy()
    srcc = float(stats.spearmanr(pred, targets[180:])[0])
    print(f"held-out SRCC of the aligned readout {srcc:.3f}")
    assert srcc > 0.6  # 0.79 here; a stage that does not train leaves a random readout (about 0)
    assert not readout.weight.requires_grad


def test_train_with_an_alignment_stage_logs_it_and_changes_the_result(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    from qalign.cli import main
    from test_train import write_corpus

    labels = write_corpus(tmp_path / "corpus", n=40)
    common = ["train", "--data", str(labels), "--model", str(tiny_model_dir), "--mixed-precision", "no",
              "--epochs", "1", "--batch-size", "8", "--seed", "0", "--log-every", "1000"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "aligned"), "--align-epochs", "2"]) == 0
    captured = capsys.readouterr()
    log = captured.out + captured.err  # accelerate prints the training log on stdout
    assert "align step 2/2" in log  # 2 epochs of 30 train items, one batch of max(8, 32) each
    assert "after alignment, the readout's held-out" in log
    plain, aligned = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "aligned"))
    key = "visual_abstractor.query_embeds"
    assert not torch.equal(plain[key], aligned[key])
    config = json.loads((tmp_path / "aligned" / "training.json").read_text())["config"]
    assert config["align_epochs"] == 2


def test_resize_flag_is_for_fresh_models_only(tmp_path, tiny_model_dir, capsys):
    from qalign.cli import main

    code = main(["train", "--data", str(tmp_path / "x.csv"), "--model", str(tiny_model_dir), "--output",
                 str(tmp_path / "o"), "--resize", "crop"])
    assert code == 2
    assert "--resize" in capsys.readouterr().err


def test_feature_cache_is_recomputed_when_the_preprocessing_changes(tmp_path, tiny_model_dir, capsys):
    """The cache of vision features belongs to (images, size/resize): another mode recomputes it."""
    from types import SimpleNamespace

    from qalign.train import Record, TrainConfig, _cached_features, build_tiny

    cfg = TrainConfig(data="unused", output=str(tmp_path), model=str(tiny_model_dir), feature_batch=4)
    model, config, _, _ = build_tiny(cfg)
    for i in range(3):
        _noise_image(120, 80, seed=i).save(tmp_path / f"{i}.png")
    records = [Record(str(tmp_path / f"{i}.png"), 3.0, None, "train") for i in range(3)]
    accelerator = SimpleNamespace(is_main_process=True, mixed_precision="no", device=torch.device("cpu"),
                                  wait_for_everyone=lambda: None)

    def features(mode: str) -> torch.Tensor:
        prep = lambda im: preprocess_image(im, config.image_size, mode)  # noqa: E731
        return _cached_features(model, prep, records, cfg, accelerator, tmp_path, f"{config.image_size}/{mode}")

    squash = features("squash")
    capsys.readouterr()
    assert torch.equal(features("squash"), squash)  # read back, not recomputed
    assert "recomputing" not in capsys.readouterr().err
    crop = features("crop")
    assert "recomputing" in capsys.readouterr().err
    assert not torch.equal(crop, squash)
