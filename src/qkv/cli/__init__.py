"""The ``qkv`` command line: ``qkv demo | explain | train | translate | summarize``.

Each command lives in its own module and registers itself on :data:`app`; heavy imports
(torch, models) happen inside the commands so ``qkv --help`` stays fast. Bad input
(ValueError, TypeError, OSError raised by qkv, and the parser's usage errors) becomes one
line on stderr and exit code 2, the library's argument names shown as flags
(:mod:`qkv.cli.flags`); Ctrl-C at any moment is one line and exit code 130. Set
``QKV_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from .interrupt import exit_interrupted

__all__ = ["UsageError", "app", "fail", "main"]


def __getattr__(name: str):
    # The parser and the commands are imported on first use, inside main()'s guard, so
    # that Ctrl-C while they load is a clean exit too.
    if name in ("UsageError", "app", "fail"):
        from . import app as app_module

        _register()
        return getattr(app_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register():
    """Importing a command module registers its command on ``app``."""
    from typer.core import TyperCommand

    from . import demo, explain, summarize, train  # noqa: F401  (one module per command)
    from .app import PlainFlagsCommand, app

    for command in app.registered_commands:  # every command's --help: flags without a type
        if command.cls in (None, TyperCommand):
            command.cls = PlainFlagsCommand
    return app


def _error(message: str) -> None:
    print(f"qkv: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qkv`` console script; ``main(["demo", ...])`` runs a command
    in this process (it always ends by SystemExit with the command's exit code).

    After Ctrl-C the console script ignores further Ctrl-C until the process ends, so a
    second press cannot break its exit. Called with ``argv`` (in-process), the caller's
    Ctrl-C handler is put back on the way out: the caller goes on running.
    """
    if argv is None or threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.getsignal(signal.SIGINT)
    try:
        return _main(argv)
    finally:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None) -> None:
    debug = bool(os.environ.get("QKV_DEBUG"))
    try:
        app = _register()
        try:
            from typer._click.exceptions import NoArgsIsHelpError
            from typer._click.exceptions import UsageError as ParserError
        except ImportError:  # a typer that uses click itself
            from click.exceptions import NoArgsIsHelpError
            from click.exceptions import UsageError as ParserError
        from .flags import to_flags

        try:
            code = app(args=argv, prog_name="qkv", standalone_mode=False)
        except NoArgsIsHelpError as e:  # `qkv` alone, `qkv train` without TASK: the help
            e.show()
            sys.exit(e.exit_code)
        except ParserError as e:  # the parser's usage errors: one line, not a box
            where = e.ctx.command_path if e.ctx is not None else "qkv"
            _error(f"{e.format_message()} (see: {where} --help)")
        except (ValueError, TypeError, OSError) as e:
            if debug:
                raise
            _error(to_flags(str(e)) or type(e).__name__)
        except MemoryError:
            if debug:
                raise
            _error("out of memory; use smaller sizes (or set QKV_DEBUG=1 to see where)")
        if code == 130:  # typer turns a KeyboardInterrupt in a command into Exit(130)
            raise KeyboardInterrupt
        # As in the parser's standalone mode: always leave through SystemExit (the code
        # of typer.Exit(code), else 0).
        sys.exit(code if isinstance(code, int) else 0)
    except (KeyboardInterrupt, RuntimeError) as e:  # Ctrl-C at any moment (or the parser's
        # Abort, a RuntimeError it raises for Ctrl-C at a prompt)
        abort = getattr(sys.modules.get("typer"), "Abort", KeyboardInterrupt)
        if debug or not isinstance(e, (KeyboardInterrupt, abort)):
            raise
        exit_interrupted()  # one line, exit code 130 (and SIGINT ignored from here on)
