"""Viewers of :class:`qkv.attention_map.AttentionMap`: terminal (rich), PNG/SVG
(matplotlib) and a self-contained HTML page. They take plain maps, never models.

Import the one you need (``from qkv.viz import terminal``); each imports its own heavy
dependency (rich, matplotlib) only when used.
"""

from __future__ import annotations

__all__ = ["html", "png", "terminal"]
