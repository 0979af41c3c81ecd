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

DEFAULT_TEXT = "The animal didn't cross the street because it was too tired"
OUTPUTS = (".html", ".png", ".svg", ".json", ".npz")
PRONOUNS = frozenset((  # personal, possessive and reflexive English pronouns
    "i", "me", "my", "mine", "myself", "you", "your", "yours", "yourself", "yourselves",
    "he", "him", "his", "himself", "she", "her", "hers", "herself", "it", "its", "itself",
    "we", "us", "our", "ours", "ourselves", "they", "them", "their", "theirs", "themselves",
))


@app.command()
def explain(
    text: Annotated[str, typer.Argument(help="The sentence to explain (quote it).")],
    word: Annotated[str | None, typer.Option(
        help="The word whose attention to show (default: the pronoun that looks hardest at "
             "the rest of the sentence, else the last word).")] = None,
    layer: Annotated[int | None, typer.Option(
        help="Layer of the heatmap, from 0 (default: the one where the word's strongest "
             "link to another word is).")] = None,
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
                        "model.safetensors and tokenizer.json.")] = "all-MiniLM-L6-v2",
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse text longer than the model's positions instead of "
                         "truncating it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
    = False,
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

    import torch

    from ..models import load_pretrained

    # One text is too little work to share: on a busy 2-core machine a second thread
    # turns the 15-token forward from ~15 ms into ~0.5 s of waiting for each other.
    torch.set_num_threads(1)
    net = load_pretrained(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = net.attend(text, pair, strict=strict)
    for w in caught:
        print(f"qkv: warning: {w.message}", file=sys.stderr)
    for name, val, n in (("--layer", layer, base.num_layers), ("--head", head, base.num_heads)):
        if val is not None and val >= n:
            raise ValueError(f"{name} {val} is out of range: {net.name} has {n} "
                             f"{name[2:]}s, numbered 0 to {n - 1}")
    if rollout:
        base = base.rollout()
        layer = head = None
    view = base.merge_words() if words else base
    if hide_special:
        view = view.drop_special()
    units = base.units(words=words, hide_special=hide_special)
    index = view.find(word) if word is not None else default_word(view)
    chosen_layer, chosen_head = best_head(view, index, layer=layer, head=head)

    written = None
    if output is not None:
        written = _write(output, base, view, layer=layer, head=head,
                         shown=(chosen_layer, chosen_head), token=units[index][0],
                         words=words, hide_special=hide_special)
    if as_json:
        typer.echo(json.dumps(_summary(view, index, chosen_layer, chosen_head, text=text,
                                       pair=pair, rollout=rollout, hide_special=hide_special,
                                       output=written), ensure_ascii=False))
        return
    _print(view, index, chosen_layer, chosen_head, layer=layer, head=head, written=written)


# ---- choices --------------------------------------------------------------------------------
def default_word(amap) -> int:
    """The pronoun that puts the most weight on other, non-special units (averaged over
    every layer and head); without a pronoun, the last unit with a letter or digit."""
    special = amap.query_special
    key_special = amap.keys_special
    best, best_score = None, -1.0
    for i, tok in enumerate(amap.tokens):
        if special[i] or tok.strip(".,;:!?\"'()").lower() not in PRONOUNS:
            continue
        others = [j for j in range(len(amap.keys)) if j != i and not key_special[j]]
        score = float(amap.weights[:, :, i, others].sum(-1).mean()) if others else 0.0
        if score > best_score:
            best, best_score = i, score
    if best is not None:
        return best
    for i in range(len(amap.tokens) - 1, -1, -1):
        if not special[i] and any(c.isalnum() for c in amap.tokens[i]):
            return i
    return len(amap.tokens) - 1


def best_head(amap, index: int, *, layer: int | None, head: int | None) -> tuple[int, int]:
    """The (layer, head) where query ``index`` gives its largest weight to another,
    non-special key, among the layers/heads allowed by ``layer``/``head``."""
    key_special = amap.keys_special
    others = [j for j in range(len(amap.keys)) if not key_special[j]
              and not (amap.is_self and j == index)]
    layers = range(amap.num_layers) if layer is None else [layer]
    heads = range(amap.num_heads) if head is None else [head]
    best, best_w = (next(iter(layers)), next(iter(heads))), -1.0
    for lay in layers:
        for h in heads:
            w = float(amap.weights[lay, h, index, others].max()) if others else 0.0
            if w > best_w:
                best, best_w = (lay, h), w
    return best


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
def _summary(view, index, layer, head, *, text, pair, rollout, hide_special, output) -> dict:
    top = []
    for lay in range(view.num_layers):
        for h in range(view.num_heads):
            top.append({"layer": lay, "head": h, "keys": [
                {"index": j, "key": view.keys[j], "weight": w}
                for j, w in view.top(lay, h, index, 3)]})
    return {
        "model": view.model, "text": text, "pair": pair, "word": view.tokens[index],
        "index": index, "layer": layer, "head": head, "level": view.level,
        "hide_special": hide_special, "rollout": rollout, "output": output, "top": top,
        "map": view.to_json(),
    }


def _print(view, index, chosen_layer, chosen_head, *, layer, head, written) -> None:
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
    con.print(terminal.heatmap(view, chosen_layer, chosen_head, highlight=index))
    if written:
        con.print(Text(f"wrote {written}"))
