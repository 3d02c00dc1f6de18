"""Shared fixtures: a tiny random qalign-tiny folder (built once per session, offline) and a
handful of distinct test images."""

from __future__ import annotations

import os
from pathlib import Path

# One OpenMP thread per process: the tiny models gain nothing from more, and on a shared small
# machine OpenMP's spinning worker threads make a run 10-20x slower under load. Set before any
# test module imports torch; an explicit OMP_NUM_THREADS from the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from tiny_model import write_images


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete random qalign-tiny folder (config + model.safetensors + tokenizer)."""
    from tiny_model import build_tiny_folder

    return build_tiny_folder(tmp_path_factory.mktemp("qalign-tiny-random"))


@pytest.fixture(scope="session")
def tiny_scorer(tiny_model_dir):
    import qalign

    return qalign.load(str(tiny_model_dir), device="cpu", batch_size=4)


@pytest.fixture(scope="session")
def image_paths(tmp_path_factory) -> list[str]:
    """16 distinct PNG images on disk, in sorted order."""
    return write_images(tmp_path_factory.mktemp("images"), 16)
