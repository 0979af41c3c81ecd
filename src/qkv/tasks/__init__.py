"""Training data for qkv's sequence-to-sequence Transformer: ``dates``, ``reverse``, ``sort``,
``copy``; see :func:`get_task`. Each task is a deterministic, seeded generator with train and
validation splits that never overlap, and a character-level tokenizer covering all of it."""

from __future__ import annotations

from .base import Example, Task
from .dates import DatesTask
from .synthetic import CopyTask, ReverseTask, SortTask
from .tokenizer import BOS, EOS, PAD, CharTokenizer

__all__ = ["BOS", "EOS", "PAD", "TASKS", "CharTokenizer", "Example", "Task", "get_task"]

TASKS: dict[str, type[Task]] = {
    "dates": DatesTask,
    "reverse": ReverseTask,
    "sort": SortTask,
    "copy": CopyTask,
}


def get_task(name: str, **options) -> Task:
    """The task called ``name`` built with ``options`` (each task's keyword arguments)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for task {name!r}: {e}") from None
