"""How many CPU threads a command gives torch, and giving the caller's count back after.

The rule: every command runs torch on **one thread** unless ``--threads N`` says otherwise.
qkv's commands run small models (a 64-wide seq2seq Transformer, a 384-wide 6-layer encoder
on one sentence, 3x3 matrices): each operation is far too small to gain from splitting it,
and a split operation ends in a barrier where every thread waits for the slowest. When
another process holds one of the cores, that wait is a scheduler time slice per operation,
so two threads can be many times slower than one (``python benchmarks/threads.py`` measures
it). For a large model on an otherwise idle machine, pass ``--threads`` with the number of
free cores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Torch threads a command uses when ``--threads`` is not given.
DEFAULT_THREADS = 1

THREADS_HELP = ("CPU threads for torch (default: 1; small models run fastest on one thread, "
                "and more stall when another program uses a core).")


def check_threads(threads: int | None) -> int:
    """The thread count to use: ``threads``, or the default; refuse a count below 1."""
    if threads is None:
        return DEFAULT_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be a whole number >= 1; got {threads!r}")
    return threads


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the body with torch on ``threads`` threads (default :data:`DEFAULT_THREADS`),
    then restore the caller's count: a command called in-process (tests, notebooks) leaves
    torch as it found it."""
    from .interrupt import import_torch

    torch = import_torch()  # Ctrl-C waits for the end of torch's import (see sigint_held)

    n = check_threads(threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(saved)


def threads_option():
    """The ``--threads`` option every command that runs torch takes."""
    import typer

    return typer.Option("--threads", help=THREADS_HELP, show_default=False)


def uses_threads(command: Callable) -> Callable:
    """Run a command (with a ``threads`` parameter) inside :func:`torch_threads`."""

    @functools.wraps(command)  # typer reads the command's own signature through this
    def run(*args, threads: int | None = None, **kwargs):
        with torch_threads(threads):
            return command(*args, threads=threads, **kwargs)

    return run
