"""``qkv explain TEXT``: what each head of a pretrained model attends to, on your sentence.

Runs the text through a BERT encoder built from qkv's layers (default: all-MiniLM-L6-v2)
and shows, for one word, the top keys of every layer and head and a heatmap of one head;
``-o`` writes the full picture as .html, .png/.svg or the data as .json/.npz.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .threads import threads_option, uses_threads

DEFAULT_TEXT = "The animal didn't cross the street because it was too tired"
OUTPUTS = (".html", ".png", ".svg", ".json", ".npz")


@app.command()
@uses_threads
def explain(
    text: Annotated[str, typer.Argument(help="The sentence to explain (quote it).")],
    word: Annotated[str | None, typer.Option(
        help="The word whose attention to show; the:2 is the second 'the' (default: the "
             "pronoun that looks hardest at the rest of the sentence, else the last word).")]
    = None,
    layer: Annotated[int | None, typer.Option(
        help="Layer of the heatmap, from 0 (default: the head where the word's strongest "
             "link reaches another word, not itself, a neighbour or [CLS]/[SEP]).")] = None,
    head: Annotated[int | None, typer.Option(
        help="Head of the heatmap, from 0 (default: as for --layer).")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output",
        help="Also write a file, by extension: .html (interactive page), .png/.svg (all "
             "layers x heads, or one head with --layer and --head), .json/.npz (the data).")]
    = None,
    words: Annotated[bool, typer.Option(
        "--words/--tokens", help="Merge subword tokens into words, or show raw tokens.")]
    = True,
    hide_special: Annotated[bool, typer.Option(
        "--hide-special", help="Hide [CLS]/[SEP] and renormalise each row.")] = False,
    rollout: Annotated[bool, typer.Option(
        "--rollout", help="Show attention rollout (all layers combined) instead of heads.")]
    = False,
    pair: Annotated[str | None, typer.Option(
        help="A second sentence: explain the pair as BERT reads it, [SEP] between.")] = None,
    model: Annotated[str, typer.Option(
        "--model", help="all-MiniLM-L6-v2 or a directory with config.json, "
                        "model.safetensors and tokenizer.json (BERT, or any Hugging Face "
                        "model whose attention uses PyTorch's SDPA).")] = "all-MiniLM-L6-v2",
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse text longer than the model's positions instead of "
                         "truncating it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
    = False,
    threads: Annotated[int | None, threads_option()] = None,
) -> None:
    """Show what each attention head of a real pretrained model attends to.

    Example: qkv explain "The animal didn't cross the street because it was too tired"
    """
    if not text.strip():
        raise ValueError("TEXT is empty; give a sentence, e.g. qkv explain "
                         f"\"{DEFAULT_TEXT}\"")
    for name, val in (("--layer", layer), ("--head", head)):
        if val is not None and val < 0:
            raise ValueError(f"{name} must be >= 0 (layers and heads count from 0); got {val}")
    if rollout and (layer not in (None, 0) or head not in (None, 0)):
        raise ValueError("--rollout combines every layer and head into one map; drop "
                         "--layer/--head")
    if output is not None:
        _check_output(output)

    from ..head_choice import choose_head, default_query
    from ..models import load_pretrained
    from .explain_hf import attend, is_hf_dir

    hf = is_hf_dir(model)  # any other Hugging Face model, run by transformers
    net = None if hf else load_pretrained(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = attend(model, text, pair, strict=strict) if hf else net.attend(
            text, pair, strict=strict)
    for w in caught:
        if hf and not issubclass(w.category, UserWarning):
            continue  # transformers' deprecation notes are not about the user's input
        print(f"qkv: warning: {w.message}", file=sys.stderr)
    for name, val, n in (("--layer", layer, base.num_layers), ("--head", head, base.num_heads)):
        if val is not None and val >= n:
            raise ValueError(f"{name} {val} is out of range: {base.model} has {n} "
                             f"{name[2:]}s, numbered 0 to {n - 1}")
    if rollout:
        base = base.rollout()
        layer = head = None
    view = base.merge_words() if words else base
    if hide_special:
        view = view.drop_special()
    units = base.units(words=words, hide_special=hide_special)
    index = view.find(word) if word is not None else default_query(view)
    choice = None
    if view.kind == "rollout":
        chosen_layer = chosen_head = 0
    elif layer is not None and head is not None:
        chosen_layer, chosen_head = layer, head
    else:
        choice = choose_head(view, index, layers=None if layer is None else [layer],
                             heads=None if head is None else [head])
        chosen_layer, chosen_head = choice.layer, choice.head

    written = None
    if output is not None:
        written = _write(output, base, view, layer=layer, head=head,
                         shown=(chosen_layer, chosen_head), token=units[index][0],
                         words=words, hide_special=hide_special)
    if as_json:
        typer.echo(json.dumps(_summary(view, index, chosen_layer, chosen_head, text=text,
                                       pair=pair, rollout=rollout, hide_special=hide_special,
                                       output=written, choice=choice), ensure_ascii=False))
        return
    _print(view, index, chosen_layer, chosen_head, layer=layer, head=head, written=written,
           choice=choice)


# ---- output files ---------------------------------------------------------------------------
def _check_output(path: Path) -> None:
    """Refuse an unknown extension or an unwritable place before any work is done."""
    ext = path.suffix.lower()
    if ext not in OUTPUTS:
        raise ValueError(f"cannot write {str(path)!r}: unknown extension "
                         f"{ext or '(none)'!r}; expected one of {', '.join(OUTPUTS)}")
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: it is a directory")
    if not parent.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: the directory {str(parent)!r} does not "
                         "exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {str(path)!r}: permission denied")


def _write(path: Path, base, view, *, layer, head, shown, token, words, hide_special) -> str:
    ext = path.suffix.lower()
    if ext == ".html":
        from ..viz import html

        html.save(base, path, layer=shown[0], head=shown[1], query=token, words=words,
                  hide_special=hide_special)
    elif ext in (".png", ".svg"):
        from ..viz import png

        png.save(view, path, layer=layer, head=head)
    elif ext == ".json":
        view.save_json(path)
    else:
        view.save_npz(path)
    return str(path)


# ---- printing -------------------------------------------------------------------------------
def _summary(view, index, layer, head, *, text, pair, rollout, hide_special, output,
             choice) -> dict:
    top = []
    for lay in range(view.num_layers):
        for h in range(view.num_heads):
            top.append({"layer": lay, "head": h, "keys": [
                {"index": j, "key": view.keys[j], "weight": w}
                for j, w in view.top(lay, h, index, 3)]})
    return {
        "model": view.model, "text": text, "pair": pair, "word": view.tokens[index],
        "index": index, "layer": layer, "head": head, "level": view.level,
        "reason": None if choice is None else choice.reason,
        "choice": None if choice is None else choice.to_json(),
        "hide_special": hide_special, "rollout": rollout, "output": output, "top": top,
        "map": view.to_json(),
    }


def _print(view, index, chosen_layer, chosen_head, *, layer, head, written, choice) -> None:
    from rich.console import Console
    from rich.text import Text

    from ..viz import terminal

    # The user's words are printed as text, never parsed as rich markup ("[/x]" is a word).
    con = Console(highlight=False)
    what = "attention rollout" if view.kind == "rollout" else (
        f"{view.num_layers} layers x {view.num_heads} heads")
    n = sum(not s for s in view.query_special)
    con.print(Text.assemble(f"{view.model}: {what}, {n} "
                            f"{view.level[:-1] if n == 1 else view.level}; showing where ",
                            (view.tokens[index], "bold"), " looks"))
    con.print(terminal.top_table(
        view, index, layers=None if layer is None else [layer],
        heads=None if head is None else [head],
        title=Text(f"top keys of '{view.tokens[index]}' per layer and head")))
    con.print()
    if choice is not None:
        con.print(Text(f"head shown: {choice.reason}"))
    con.print(terminal.heatmap(view, chosen_layer, chosen_head, highlight=index))
    if written:
        con.print(Text(f"wrote {written}"))
