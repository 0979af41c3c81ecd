"""The library names arguments in its errors (``word=``, ``strict=True``); the command line
shows its flags instead (``--word``, ``--strict``). :func:`to_flags` rewrites a message."""

from __future__ import annotations

import re

__all__ = ["FLAGS", "to_flags"]

#: Argument name in library messages -> the flag of the command line that sets it.
FLAGS = {
    "batch_size": "--batch-size",
    "d_model": "--d-model",
    "device": "--device",
    "eval_size": "--eval-size",
    "ff_dim": "--ff-dim",
    "lr": "--lr",
    "nproc": "--nproc",
    "out": "--out",
    "resume": "--resume",
    "strict": "--strict",
    "word": "--word",
}

# `name=` at the start of a word (not inside a quoted text: the character before it is
# the start, a space or an opening bracket), then its value: True, a quoted string, a
# number or a placeholder in capitals, or nothing.
_ARG = re.compile(r"(?:^|(?<=[\s(\[]))(" + "|".join(FLAGS) +
                  r")=(True\b|'[^']*'|\"[^\"]*\"|[-\w.:]+)?")
_PLAIN = re.compile(r"[\w./:-]+")  # a value that needs no quotes on a command line


def _flag(m: re.Match) -> str:
    flag, value = FLAGS[m.group(1)], m.group(2)
    if value is None or value == "True":  # a switch, or the option without its value
        return flag
    if value[0] in "'\"" and _PLAIN.fullmatch(value[1:-1]):
        value = value[1:-1]
    return f"{flag} {value}"


def to_flags(message: str) -> str:
    """``message`` with every ``name=value`` of a known argument shown as ``--flag value``
    (``strict=True`` as ``--strict``, ``out=`` as ``--out``)."""
    return _ARG.sub(_flag, message)
