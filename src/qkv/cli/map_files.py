"""Writing a cross-attention map to the file named by ``--output``: one rule for every command
that shows an alignment (``translate``, ``summarize``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MAP_FILES = (".png", ".svg", ".html", ".htm")

# The options that pick what of a decoder's cross-attention is shown.
LayerOption = Annotated[int | None, typer.Option(
    help="Decoder layer to show (default: the last).", show_default=False)]
HeadOption = Annotated[int | None, typer.Option(
    help="Head to show (default: every head).", show_default=False)]


def check_map_file(output: Path | None) -> None:
    """Refuse an output name the map cannot be written as, before any work is done."""
    if output is not None and output.suffix.lower() not in MAP_FILES:
        raise ValueError(f"cannot write {output.name!r}: expected a .png, .svg or .html file; "
                         "give a name ending in one of these")


def save_map_file(amap, output: Path, *, layer: int, head: int | None) -> None:
    """Write ``amap`` by extension: an interactive page (opened on ``head``, or head 0) or a
    PNG/SVG picture of one head, or of every head of ``layer`` when ``head`` is None."""
    if output.suffix.lower() in (".html", ".htm"):
        from ..viz import html

        html.save(amap, output, layer=layer, head=0 if head is None else head)
    else:
        from ..viz import png

        png.save(amap, output, layer=layer, head=head)
    typer.echo(f"wrote {output}", err=True)
