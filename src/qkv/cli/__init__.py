"""The ``qkv`` command line: ``qkv demo | explain | train | translate | bench``.

Each command lives in its own module and registers itself on :data:`app`; heavy imports
(torch, models) happen inside the commands so ``qkv --help`` stays fast. Bad input
(ValueError, TypeError, OSError raised by qkv) becomes one line on stderr and exit code 2;
set ``QKV_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

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


# Importing a command module registers its command on `app`.
from . import demo  # noqa: E402,F401,I001  (one import per command module)
from . import explain  # noqa: E402,F401  (qkv explain)
from . import train  # noqa: E402,F401  (qkv train, qkv translate)


class UsageError(ValueError):
    """A bad command-line input that was caught by qkv itself (exit code 2)."""


def fail(message: str) -> None:
    """Stop the command with a one-line error and exit code 2."""
    raise UsageError(message)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qkv`` console script."""
    try:
        # Standalone mode: usage errors of the parser print themselves and exit 2.
        app(args=argv, prog_name="qkv")
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("QKV_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"qkv: error: {message}", file=sys.stderr)
        sys.exit(2)
