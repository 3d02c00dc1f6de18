"""Tiny random Qwen2.5-VL and LLaVA folders score through the same CLI and Python API as every model."""

from __future__ import annotations

import csv
import io

import pytest

import qalign
from qalign.cli import main
from tiny_model import write_images
from tiny_vlms import build_llava, build_qwen2_5_vl


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def vlm_dir(request, tmp_path_factory):
    build = {"qwen2_5_vl": build_qwen2_5_vl, "llava": build_llava}[request.param]
    return build(tmp_path_factory.mktemp(request.param))


def test_cli_and_api_agree(vlm_dir, tmp_path, capsys):
    images = [str(p) for p in write_images(tmp_path, 3)]
    assert main(["score", *images, "--model", str(vlm_dir), "--format", "csv", "--batch-size", "2"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in rows] == images and all(r["error"] == "" for r in rows)
    api = qalign.load(str(vlm_dir), device="cpu").score(images)
    for row, ref in zip(rows, api):
        assert float(row["score_1_5"]) == pytest.approx(ref.score, abs=1e-5)
        assert 1.0 <= ref.score <= 5.0 and sum(ref.probs) == pytest.approx(1.0)
