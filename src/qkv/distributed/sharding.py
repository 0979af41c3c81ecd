"""Cutting one sequence into per-rank shards and putting it back together.

With ``layout="contiguous"`` rank ``r`` of ``N`` holds positions ``[r L/N, (r+1) L/N)``;
with ``layout="zigzag"`` the sequence is cut into ``2N`` chunks and rank ``r`` holds chunks
``r`` and ``2N-1-r`` (equal causal work per rank in :func:`~qkv.distributed.ring_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LAYOUTS", "gather_sequence", "shard_positions", "shard_sequence",
           "unshard_sequence"]

#: The ways a sequence can be cut into per-rank shards.
LAYOUTS = ("contiguous", "zigzag")


def _check_split(length: int, world_size: int, layout: str) -> int:
    """The shard length for ``length`` positions over ``world_size`` ranks."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int; got {world_size!r}")
    parts = world_size * (2 if layout == "zigzag" else 1)
    if length % parts:
        raise ValueError(f"a sequence of {length} positions cannot be cut into {parts} equal "
                         f"{'chunks' if layout == 'zigzag' else 'shards'} ({layout} layout, "
                         f"{world_size} ranks). Fix: pad it to a multiple of {parts}")
    return length // world_size


def shard_positions(length: int, rank: int, world_size: int, *,
                    layout: str = "contiguous") -> Tensor:
    """Global positions held by ``rank``: int64 ``(length / world_size,)``, increasing.

    Use them for positional encodings of a shard (e.g. rotary angles).
    """
    n = _check_split(length, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n)
    c = n // 2
    last = 2 * world_size - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange(last * c, (last + 1) * c)])


def shard_sequence(x: Tensor, rank: int, world_size: int, *, layout: str = "contiguous",
                   dim: int = -2) -> Tensor:
    """The shard of the full sequence ``x`` that ``rank`` holds (positions along ``dim``).

    ``x (B, H, L, D)`` with the default ``dim=-2`` gives ``(B, H, L/N, D)``. Contiguous: a
    view; zigzag: a copy of chunks ``rank`` and ``2N-1-rank``.
    """
    n = _check_split(x.shape[dim], world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
    if layout == "contiguous":
        return x.narrow(dim, rank * n, n)
    c = n // 2
    last = 2 * world_size - 1 - rank
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, last * c, c)], dim=dim)


def unshard_sequence(shards: Sequence[Tensor], *, layout: str = "contiguous",
                     dim: int = -2) -> Tensor:
    """The full sequence from the shards of ranks ``0 .. N-1`` (inverse of
    :func:`shard_sequence`)."""
    if not shards:
        raise ValueError("unshard_sequence needs the shards of every rank; got none")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    lengths = [s.shape[dim] for s in shards]
    if len(set(lengths)) > 1:
        raise ValueError(f"shards must have equal lengths along dim {dim}; got {lengths}")
    if layout == "contiguous":
        return torch.cat(list(shards), dim=dim)
    if lengths[0] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks, so an even length; got "
                         f"{lengths[0]}")
    world = len(shards)
    c = lengths[0] // 2
    chunks: list[Tensor | None] = [None] * (2 * world)
    for r, s in enumerate(shards):
        chunks[r] = s.narrow(dim, 0, c)
        chunks[2 * world - 1 - r] = s.narrow(dim, c, c)
    return torch.cat(chunks, dim=dim)


def gather_sequence(x: Tensor, *, group=None, layout: str = "contiguous",
                    dim: int = -2) -> Tensor:
    """All-gather every rank's shard ``x`` and return the full sequence on every rank (not
    differentiable; for evaluation, logging and tests)."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_sequence(parts, layout=layout, dim=dim)
