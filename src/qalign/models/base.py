"""The contract every scoring backend implements.

A backend turns preprocessed media into the five level logits (bad..excellent) at the position
where the model would say the level word. Everything after that (softmax over the five, the
expectation, the score ranges, rows, files) is shared code in ``qalign.levels`` and
``qalign.scoring`` and never re-implemented per backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from ..prompts import check as check_task


class UnsupportedTask(ValueError):
    """The model was not trained for the task asked of it."""


@dataclass(frozen=True)
class ModelInfo:
    """What a backend can do; printed by ``qalign models``."""

    name: str
    tasks: tuple[str, ...] = ("quality",)
    # "native": all frames of a video spliced into one prompt (trained on video);
    # "per-frame": each frame scored as an image and the level logits averaged.
    video: str = "per-frame"
    description: str = ""
    refusals: dict[str, str] = field(default_factory=dict)  # task -> why it is refused


class Backend(ABC):
    """A model that answers a Q-Align prompt with five level logits.

    Subclasses set ``info`` and implement ``preprocess`` and ``level_logits``. ``device`` and
    ``dtype`` describe where the model runs; inputs are moved there by the backend itself.
    """

    info: ModelInfo

    @abstractmethod
    def preprocess(self, image):
        """One RGB ``PIL.Image`` -> a tensor [C, H, W] ready for ``level_logits``.

        Usually float32 normalised pixels; a backend whose own processor resizes (chat VLMs)
        may return the raw uint8 image. The Scorer never looks inside, it only batches.
        """

    @abstractmethod
    def level_logits(self, items: Sequence, task: str = "quality", input_kind: str = "image"):
        """Score a batch.

        ``items``: one tensor [F, C, H, W] per media item (F = 1 for an image, F frames for a
        video). Returns a float32 CPU tensor [B, 5] of the level-word logits in the order
        bad, poor, fair, good, excellent, read at the last prompt position. The result for an
        item must not depend on the other items in the batch.
        """

    def check_task(self, task: str, input_kind: str = "image") -> None:
        check_task(task, input_kind)
        if task in self.info.refusals:
            raise UnsupportedTask(self.info.refusals[task])
        if task not in self.info.tasks:
            raise UnsupportedTask(
                f"model {self.info.name!r} was not trained for {task}; it covers: {', '.join(self.info.tasks)}"
            )
