"""qkv beyond one device, on PyTorch's own distributed engine (``torch.distributed``).

* :func:`ring_attention`: exact self-attention of a sequence sharded over the ranks of a
  process group (key/value shards travel around a ring; contiguous or zigzag layout);
  :func:`shard_sequence` / :func:`unshard_sequence` / :func:`shard_positions` /
  :func:`gather_sequence` move between a full sequence and its shards.
* :mod:`qkv.distributed.ddp`: multi-process training of the seq2seq model with
  ``DistributedDataParallel`` (processes started by :func:`~qkv.distributed.ddp.launch` or
  by torchrun).
"""

from __future__ import annotations

from .ring import RingStats, record_ring_stats, ring_attention
from .sharding import (
    LAYOUTS,
    gather_sequence,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "LAYOUTS",
    "RingStats",
    "gather_sequence",
    "record_ring_stats",
    "ring_attention",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
