"""``qkv summarize RUN_DIR FILE.py[:function]``: one-sentence summaries of Python functions.

Reads a Python file (or code on stdin with ``-``) and prints ``name: summary`` for each
function (or only the one of ``FILE.py:name`` / ``--function name``). It can show the
decoder's cross-attention (summary words x code words) in the terminal
(``--show-attention``) or write it as PNG/SVG or HTML (``-o``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .map_files import HeadOption, LayerOption, check_map_file, save_map_file
from .threads import threads_option, uses_threads


def _read_code(target: str) -> tuple[str, str | None, str]:
    """(code, function name or None, label) of ``FILE.py[:function]`` or ``-`` (stdin)."""
    if target == "-":
        return sys.stdin.read(), None, "stdin"
    path, fn = Path(target), None
    if not path.exists() and ":" in target:
        head, _, name = target.rpartition(":")
        path, fn = Path(head), name or None
    if not path.exists():
        raise ValueError(f"no such file: {str(path)!r}; give a Python file, FILE.py:function, "
                         "or - to read code from stdin")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; give a Python file")
    try:
        code = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text; give a Python source file") \
            from None
    return code, fn, str(path)


@app.command("summarize")
@uses_threads
def summarize_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory of qkv train summarize.")],
    target: Annotated[str, typer.Argument(
        help="FILE.py, FILE.py:function (or :Class.method), or - for code on stdin.")],
    function: Annotated[str | None, typer.Option(
        "--function", "-f", help="Only this function (name or Class.method); the same as "
        "FILE.py:function, and the way to pick one from stdin.", show_default=False)] = None,
    beam: Annotated[int, typer.Option(help="Beam width; 1 = greedy decoding.")] = 4,
    length_penalty: Annotated[float, typer.Option(
        help="GNMT length penalty of the beam search; larger favours longer summaries.")]
    = 0.6,
    no_repeat_ngram: Annotated[int, typer.Option(
        help="Never repeat a token n-gram of this length in a summary (0: no limit).")] = 3,
    show_attention: Annotated[bool, typer.Option(
        "--show-attention", help="Print the cross-attention of each summary (rows = summary "
        "words, columns = code words).")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the cross-attention of the first function to FILE: "
        ".png, .svg or .html.")] = None,
    layer: LayerOption = None,
    head: HeadOption = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int | None, threads_option()] = None,
) -> None:
    """Summarise each function of a Python file with the latest checkpoint in RUN_DIR."""
    from ..decode import load_run
    from ..summarizer import check_summarize_run, summarize_code

    if isinstance(beam, bool) or beam < 1:
        raise ValueError(f"--beam must be >= 1; got {beam}")
    if not 0 <= length_penalty <= 10:
        raise ValueError(f"--length-penalty must be in [0, 10]; got {length_penalty}")
    check_map_file(output)
    code, in_target, _ = _read_code(target)
    if function is not None and in_target is not None and function != in_target:
        raise ValueError(f"two functions asked for: {in_target!r} in {target!r} and "
                         f"--function {function!r}; give one")
    function = function or in_target
    if not code.strip():
        raise ValueError("the code is empty; give a Python file or pipe Python code on stdin")
    run = load_run(run_dir, device=device)
    check_summarize_run(run)
    results = summarize_code(run, code, function=function, beam=beam,
                             length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram,
                             attention=show_attention or output is not None)
    for r in results:
        typer.echo(f"{r.name}: {r.summary}")
    if not (show_attention or output is not None):
        return
    first = results[0].attention.merge_words()
    layer = first.num_layers - 1 if layer is None else layer
    heads = list(range(first.num_heads)) if head is None else [head]
    for h in heads:
        first.check_head(layer, h)
    if show_attention:
        from rich.console import Console
        from rich.text import Text

        from ..viz import terminal

        con = Console()
        for r in results:
            amap = r.attention.merge_words()
            for h in heads:
                con.print(Text(f"{r.name}: cross-attention, decoder layer {layer}, head {h}: "
                               "rows = summary words, columns = code words", style="bold"))
                con.print(terminal.heatmap(amap, layer, h))
    if output is not None:
        save_map_file(first, output, layer=layer, head=head)
