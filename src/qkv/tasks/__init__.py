"""Training data for qkv's sequence-to-sequence Transformer: ``dates``, ``reverse``, ``sort``,
``copy``, ``summarize``; see :func:`get_task`. Each task is a deterministic, seeded generator
with train and validation splits that never overlap, and a tokenizer covering all of it
(characters; byte-level BPE subwords for ``summarize``)."""

from __future__ import annotations

from .base import Example, OutsideTaskWarning, Task
from .dates import DatesTask
from .subword import SubwordTokenizer
from .summarize import SummarizeTask
from .synthetic import CopyTask, ReverseTask, SortTask
from .tokenizer import BOS, EOS, PAD, CharTokenizer

__all__ = ["BOS", "EOS", "PAD", "TASKS", "CharTokenizer", "Example", "OutsideTaskWarning",
           "SubwordTokenizer", "Task", "get_task", "load_tokenizer"]

TASKS: dict[str, type[Task]] = {
    "dates": DatesTask,
    "reverse": ReverseTask,
    "sort": SortTask,
    "copy": CopyTask,
    "summarize": SummarizeTask,
}


def load_tokenizer(d: dict) -> CharTokenizer | SubwordTokenizer:
    """The tokenizer saved as ``d`` (``to_dict()`` of either kind; ``type`` tells which)."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "bpe":
        return SubwordTokenizer.from_dict(d)
    return CharTokenizer.from_dict(d)


def get_task(name: str, **options) -> Task:
    """The task called ``name`` built with ``options`` (each task's keyword arguments)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for task {name!r}: {e}") from None
