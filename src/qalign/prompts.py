"""Questions and answer prefixes of Q-Align, per task (quality, aesthetics) and input (image, video).

Pure strings; tokenisation belongs to each model backend. The image placeholder marks where the
visual tokens are spliced in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("quality", "aesthetics")
INPUTS = ("image", "video")
IMAGE_PLACEHOLDER = "<|image|>"

_TRAINING_QUESTIONS = {
    "quality": (
        "How would you rate the quality of this {input}?",
        "Can you rate the quality of this {noun}?",
        "What is your quality rating for this {input}?",
        "Rate the quality of this {input}.",
        "Could you evaluate the quality of this {input}?",
        "How do you assess the quality of this {input}?",
    ),
    "aesthetics": (
        "How would you rate the aesthetics of this {input}?",
        "Can you evaluate the aesthetics of the {input}?",
        "Rate the aesthetics of this {noun}.",
        "How is the aesthetics of this {input}?",
    ),
}
_NOUN = {"image": "picture", "video": "clip"}


def check(task: str, input_kind: str = "image") -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if input_kind not in INPUTS:
        raise ValueError(f"unknown input kind {input_kind!r}; choose one of {', '.join(INPUTS)}")


def question(task: str = "quality", input_kind: str = "image") -> str:
    """The inference question: "How would you rate the quality of this image?"."""
    check(task, input_kind)
    return f"How would you rate the {task} of this {input_kind}?"


def answer_prefix(task: str = "quality", input_kind: str = "image") -> str:
    """What the assistant says before the level word: "The quality of the image is"."""
    check(task, input_kind)
    return f"The {task} of the {input_kind} is"


def answer(level_word: str, task: str = "quality", input_kind: str = "image") -> str:
    """The full training answer: "The quality of the image is good."."""
    return f"{answer_prefix(task, input_kind)} {level_word}."


def training_questions(task: str = "quality", input_kind: str = "image") -> tuple[str, ...]:
    check(task, input_kind)
    return tuple(q.format(input=input_kind, noun=_NOUN[input_kind]) for q in _TRAINING_QUESTIONS[task])


def random_question(rng: random.Random, task: str = "quality", input_kind: str = "image") -> str:
    return rng.choice(training_questions(task, input_kind))


@dataclass(frozen=True)
class Prompt:
    """A Q-Align prompt in the mPLUG-Owl2 conversation format, split around the image.

    ``before_image`` + <visual tokens> + ``after_image`` is what the model reads; the next token
    after ``after_image`` is the level word.
    """

    before_image: str
    after_image: str

    @property
    def text(self) -> str:
        return self.before_image + IMAGE_PLACEHOLDER + self.after_image


def owl_prompt(task: str = "quality", input_kind: str = "image", q: str | None = None) -> Prompt:
    """``USER: <question>\\n<|image|>\\nASSISTANT: The <task> of the <input> is``."""
    q = q if q is not None else question(task, input_kind)
    return Prompt(before_image=f"USER: {q}\n", after_image=f"\nASSISTANT: {answer_prefix(task, input_kind)}")
