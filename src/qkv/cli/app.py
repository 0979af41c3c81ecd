"""The typer application every command module registers itself on (kept apart from
:mod:`qkv.cli`, which imports the command modules, so that no import goes in a circle)."""

from __future__ import annotations

import typer

__all__ = ["UsageError", "app", "fail"]

app = typer.Typer(
    name="qkv",
    help="Self-attention made real: see, compute and train the Transformer's attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Self-attention made real: see, compute and train the Transformer's attention."""


class UsageError(ValueError):
    """A bad command-line input that was caught by qkv itself (exit code 2)."""


def fail(message: str) -> None:
    """Stop the command with a one-line error and exit code 2."""
    raise UsageError(message)
