"""Ctrl-C on the command line: one line, exit code 130, whenever it comes.

:func:`sigint_held` holds Ctrl-C while a third-party import that cannot be interrupted
safely runs; :func:`exit_interrupted` prints the one line and leaves with code 130.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

__all__ = ["exit_interrupted", "ignore_further_interrupts", "import_torch", "sigint_held"]


@contextmanager
def sigint_held() -> Iterator[None]:
    """Run the body with Ctrl-C held: a SIGINT that comes meanwhile is raised as
    KeyboardInterrupt when the body is done.

    Why: importing torch loads NumPy from C++ code that swallows any error, a
    KeyboardInterrupt included; Ctrl-C at that moment left NumPy half imported and the
    command failed later with an unrelated traceback. Only Python's default handler is
    replaced (an ignored SIGINT stays ignored, a caller's own handler is kept).
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        raise KeyboardInterrupt


def import_torch():
    """``import torch`` with Ctrl-C held until the import ends (see :func:`sigint_held`):
    how every command first imports it."""
    with sigint_held():
        import torch
    return torch


def ignore_further_interrupts() -> None:
    """From here on the process only exits: a Ctrl-C more (a second press, or one the
    training run already acted on) must not raise KeyboardInterrupt in exit handlers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def exit_interrupted() -> NoReturn:
    """Print ``qkv: interrupted`` and exit with code 130, for certain."""
    ignore_further_interrupts()  # another Ctrl-C cannot break the exit
    print("qkv: interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # A KeyboardInterrupt raised inside code Python compiled from a string (exec and eval:
    # dataclasses, typing and namedtuple run such code while modules import) is marked
    # unhandled by CPython even though it was caught, and `python -m qkv` then ends by
    # SIGINT after sys.exit(130) (exit status -2, not 130). Running a string clears the mark.
    exec("")
    sys.exit(130)
