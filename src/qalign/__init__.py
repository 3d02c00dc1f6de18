"""qalign: Q-Align scoring of image quality, aesthetics and video quality with LMMs.

``import qalign`` is cheap; torch and transformers load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(name_or_dir: str = "qalign-tiny", **kwargs):
    """Load a scorer by registry name, Hugging Face hub id or local directory.

    Returns a :class:`qalign.scoring.Scorer`; call ``.score(paths_or_images, task=...)``.
    Keyword arguments (``device``, ``dtype``, ``batch_size``) are passed to the backend.
    """
    from .models.registry import load_scorer

    return load_scorer(name_or_dir, **kwargs)
