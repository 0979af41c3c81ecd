"""The ``qkv`` command line: ``qkv demo | explain | train | translate | summarize``.

Each command lives in its own module and registers itself on :data:`app`; heavy imports
(torch, models) happen inside the commands so ``qkv --help`` stays fast. Bad input
(ValueError, TypeError, OSError raised by qkv) becomes one line on stderr and exit code 2,
the library's argument names shown as flags (:mod:`qkv.cli.flags`); set ``QKV_DEBUG=1`` to
see the traceback instead.
"""

from __future__ import annotations

import os
import sys

# Importing a command module registers its command on `app`.
from . import demo, explain, summarize, train  # noqa: F401  (qkv demo, explain, summarize, train)
from .app import UsageError, app, fail
from .flags import to_flags

__all__ = ["UsageError", "app", "fail", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qkv`` console script."""
    try:
        # Standalone mode: usage errors of the parser print themselves and exit 2.
        app(args=argv, prog_name="qkv")
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("QKV_DEBUG"):
            raise
        message = " ".join(to_flags(str(e)).split()) or type(e).__name__
        print(f"qkv: error: {message}", file=sys.stderr)
        sys.exit(2)
