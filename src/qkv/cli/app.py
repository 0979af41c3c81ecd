"""The typer application every command module registers itself on (kept apart from
:mod:`qkv.cli`, which imports the command modules, so that no import goes in a circle)."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["PlainFlagsCommand", "UsageError", "app", "fail"]


def _plain_flags(params: list) -> list:
    """Flags (``--strict``, ``--words/--tokens``, ``--help``) take no value: show no type
    for them in --help (typer would print ``<bool>``)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class PlainFlagsCommand(TyperCommand):
    """A command whose --help shows flags without a type."""

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


class _PlainFlagsGroup(TyperGroup):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="qkv",
    help="Self-attention made real: see, compute and train the Transformer's attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_PlainFlagsGroup,
)


def _print_version(value: bool) -> None:
    if value:
        import platform

        from .. import __version__
        from .interrupt import import_torch

        torch = import_torch()

        typer.echo(f"qkv {__version__} (torch {torch.__version__}, Python "
                   f"{platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the versions of qkv, torch and Python, and exit.")] = False,
) -> None:
    """Self-attention made real: see, compute and train the Transformer's attention."""


class UsageError(ValueError):
    """A bad command-line input that was caught by qkv itself (exit code 2)."""


def fail(message: str) -> None:
    """Stop the command with a one-line error and exit code 2."""
    raise UsageError(message)
