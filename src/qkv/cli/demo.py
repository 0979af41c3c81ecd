"""``qkv demo``: the mechanism step by step on a tiny example, with every number shown."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from .app import app

DEFAULT_QUERY = "0.2,0.1,0.3"
DEFAULT_KEYS = "0.1,0.2,0.3; 0.2,0.3,0.1; 0.3,0.1,0.2"
DEFAULT_VALUES = "1,0,0; 0,1,0; 0,0,1"


def _matrix(text: str, name: str) -> list[list[float]]:
    """Parse "a,b,c; d,e,f" into rows of floats."""
    rows = []
    for part in text.split(";"):
        if not part.strip():
            continue
        try:
            rows.append([float(x) for x in part.replace(",", " ").split()])
        except ValueError:
            raise ValueError(f"--{name} must be numbers separated by commas, rows by ';'; got "
                             f"{text!r}") from None
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError(f"--{name} must be a non-empty matrix with rows of equal length; got "
                         f"{text!r}")
    return rows


@app.command()
def demo(
    query: Annotated[str, typer.Option(help="The query vector(s): '0.2,0.1,0.3' (rows by ';').")]
    = DEFAULT_QUERY,
    keys: Annotated[str, typer.Option(help="One key per row: 'a,b,c; d,e,f'.")] = DEFAULT_KEYS,
    values: Annotated[str, typer.Option(help="One value per key, rows by ';'.")] = DEFAULT_VALUES,
    words: Annotated[str | None, typer.Option(
        help="Multi-head self-attention over these words with seeded random embeddings.")] = None,
    heads: Annotated[int | None, typer.Option(help="Number of heads (multi-head example).")]
    = None,
    head_dim: Annotated[int, typer.Option(help="Dims per head (multi-head example).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the random embeddings and projections.")]
    = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
    = False,
) -> None:
    """Walk through attention: scores, scaled scores, softmax weights, weighted sum.

    With no options: one query over three words with 3-dim embeddings (the textbook
    example). With --words/--heads: multi-head self-attention with seeded projections.
    """
    if words is not None or heads is not None:
        data = _multi_head(words if words is not None else "the cat sat",
                           1 if heads is None else heads, head_dim, seed)
    else:
        data = _single(_matrix(query, "query"), _matrix(keys, "keys"), _matrix(values, "values"))
    if as_json:  # NaN and infinities are not JSON: they become null
        typer.echo(json.dumps(_finite(data), indent=2, allow_nan=False))
    else:
        _print(data)


def _finite(x):
    """``x`` with every NaN or infinite float replaced by None (JSON's null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _single(query, keys, values) -> dict:
    import qkv

    from .interrupt import import_torch

    torch = import_torch()

    q = torch.tensor(query, dtype=torch.float64)[None]  # (1, Lq, D)
    k = torch.tensor(keys, dtype=torch.float64)[None]  # (1, Lk, D)
    v = torch.tensor(values, dtype=torch.float64)[None]  # (1, Lk, Dv)
    s = qkv.explain(q, k, v)
    return {
        "mode": "single-head",
        "query": query, "keys": keys, "values": values, "scale": s.scale,
        "scores": s.scores[0].tolist(), "scaled": s.scaled[0].tolist(),
        "weights": s.weights[0].tolist(), "output": s.output[0].tolist(),
    }


def _multi_head(words_text: str, heads: int, head_dim: int, seed: int) -> dict:
    import qkv

    from .interrupt import import_torch

    torch = import_torch()

    words = words_text.split()
    if not words:
        raise ValueError("--words must contain at least one word; got an empty string")
    if heads < 1 or head_dim < 1:
        raise ValueError(f"--heads and --head-dim must be >= 1; got {heads} and {head_dim}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63); got {seed}")
    embed = heads * head_dim
    _check_fits(len(words), heads, embed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, len(words), embed, generator=gen, dtype=torch.float64)  # (1, L, E)
    with torch.random.fork_rng(devices=[]):  # seed the projections, keep the caller's RNG
        torch.manual_seed(seed)
        mha = qkv.MultiHeadAttention(embed, heads).double().eval()
    with torch.no_grad():
        q = mha._split(mha.q_proj(x), heads)  # (1, H, L, Dh)
        k = mha._split(mha.k_proj(x), heads)  # (1, H, L, Dh)
        v = mha._split(mha.v_proj(x), heads)  # (1, H, L, Dh)
        s = qkv.explain(q, k, v)
        out = mha(x)  # (1, L, E): heads concatenated, then W_o
    return {
        "mode": "multi-head", "words": words, "heads": heads, "head_dim": head_dim,
        "seed": seed, "scale": s.scale, "embeddings": x[0].tolist(),
        "per_head": [
            {"head": h, "scores": s.scores[0, h].tolist(), "scaled": s.scaled[0, h].tolist(),
             "weights": s.weights[0, h].tolist(), "output": s.output[0, h].tolist()}
            for h in range(heads)
        ],
        "output": out[0].tolist(),
    }


def _check_fits(length: int, heads: int, embed: int) -> None:
    """Refuse, before allocating, sizes whose float64 projections (4 E x E), embeddings and
    weights (H x L x L, five steps) do not fit in free memory."""
    from ..memory import available_bytes, gib

    need = 8 * (4 * embed * (embed + 1) + 8 * length * embed + 5 * heads * length * length)
    free = available_bytes("cpu")
    if free is not None and need > free:
        fits = int((free / 8 / 4) ** 0.5)
        raise ValueError(f"--heads {heads} x --head-dim {embed // heads} = {embed} dims need "
                         f"about {gib(need)} but {gib(free)} is free; keep --heads x "
                         f"--head-dim below about {fits}")


def _table(title: str, rows, row_labels, col_labels):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(show_edge=False)
    t.add_column("")
    for c in col_labels:  # user words are text, never rich markup
        t.add_column(Text(str(c)), justify="right")
    for label, row in zip(row_labels, rows, strict=True):
        t.add_row(Text(str(label)), *(f"{x:.4f}" for x in row))
    return Group(Text(title, style="bold"), t, Text(""))


def _count(n: int, noun: str) -> str:
    """``1 head``, ``2 heads``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _print(data: dict) -> None:
    from rich.console import Console
    from rich.text import Text

    con = Console()
    if data["mode"] == "single-head":
        lq, lk, dv = len(data["query"]), len(data["keys"]), len(data["values"][0])
        qs = [f"q{i}" for i in range(lq)] if lq > 1 else ["q"]
        ks = [f"k{j}" for j in range(lk)]
        con.print("[bold]Attention, step by step[/bold]: one query over "
                  f"{lk} keys of dimension {len(data['keys'][0])}")
        con.print(_table("inputs: keys (one per row)", data["keys"], ks,
                         range(len(data["keys"][0]))))
        con.print(_table("1. scores = q · kᵀ", data["scores"], qs, ks))
        con.print(_table(f"2. scaled = scores × {data['scale']:.4f}  (1/√D)", data["scaled"],
                         qs, ks))
        con.print(_table("3. weights = softmax(scaled)  (each row sums to 1)",
                         data["weights"], qs, ks))
        con.print(_table("4. output = weights · V", data["output"], qs,
                         [f"d{j}" for j in range(dv)]))
        return
    words = data["words"]
    con.print(Text.assemble(("Multi-head self-attention", "bold"),
                            f" over {words}: {_count(data['heads'], 'head')} of "
                            f"{_count(data['head_dim'], 'dim')}, seeded random embeddings and "
                            f"projections (seed {data['seed']})"))
    for h in data["per_head"]:
        con.print(_table(f"head {h['head']}: scaled scores (row = query word)", h["scaled"],
                         words, words))
        con.print(_table(f"head {h['head']}: weights = softmax(scaled)", h["weights"], words,
                         words))
    con.print(_table("output = concat(heads) · W_o", data["output"], words,
                     [f"d{j}" for j in range(len(data["output"][0]))]))
