"""``qalign serve``: Q-Align scores over HTTP (FastAPI + uvicorn) with micro-batching, and a web page.

Needs the ``serve`` extra: ``pip install 'qalign[serve]'``. See :mod:`qalign.serve.app` for the
endpoints and :mod:`qalign.serve.batcher` for the batching.
"""

from __future__ import annotations

__all__ = ["BackgroundServer", "Settings", "create_app"]


def __getattr__(name):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
