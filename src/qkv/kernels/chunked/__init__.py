"""The chunked backend: exact attention in O(L) memory with the online softmax.

The reference materialises the ``(Lq x Lk)`` scores of every head. This backend never
does: it walks over blocks of queries and blocks of keys (FlashAttention-2's algorithm in
plain PyTorch operations, so it runs on any device) and keeps per query only

* ``row_max``: the largest score seen so far,
* ``row_sum``: the sum of ``exp(score - row_max)`` over the keys seen so far,
* ``acc``: the sum of ``exp(score - row_max) * value`` over the same keys.

When a new block raises a row's maximum, the earlier sums are rescaled by
``exp(old_max - new_max)``; after the last block ``out = acc / row_sum`` and the
log-sum-exp of the row is ``lse = row_max + log(row_sum)``. That is the softmax, exactly,
up to rounding. The backward (an :class:`torch.autograd.Function`) recomputes each block's
weights from ``q``, ``k`` and the saved row statistics (``weights = exp(score - row_max) /
row_sum``), so only ``out`` and those are kept between the passes.

Fixed shifts. The maximum only keeps ``exp`` in range: softmax does not depend on the
shift. On CPU every score of query ``i`` is at most ``bound_i = |scale| |q_i| max_j |k_j|``
in absolute value (Cauchy-Schwarz); when every bound is at most 40 the scores are
exponentiated unshifted (``row_max`` is then 0), and otherwise, once a unit's first tiles
show each row's bound within 40 of its running max, the bound is that row's shift for the
rest. Either way the later blocks skip the max and the rescaling (two passes of five over
each block of scores). NaN/inf inputs and additive masks keep the running max
(:meth:`Blocks.prepare_fixed_shifts`).

Scores are in natural units: ``q`` is multiplied by ``scale`` (a block at a time) and an
additive mask is added as given, so a finite bias of any size stays finite. The running
maximum starts at the lowest finite float, so a row that has seen no visible key yet
needs no special case (its scores are ``-inf``, its sums 0). On CPU, blocks with a mask
compute ``exp(x)`` as ``exp2(x * log2(e))``: PyTorch's CPU ``exp`` is several times slower
on arguments that underflow (the ``-inf`` of hidden keys), ``exp2`` is not. For the
backward and the weights the forward keeps each row's maximum and ``1 / sum`` apart
(``chunked_forward(..., stats=True)``) rather than one ``lse``: at scores near ``-1e9`` a
float ``max + log(sum)`` rounds ``log(sum)`` away. A NaN score makes its row NaN (it
propagates); a row that sees no key gives 0.

Masks. A :class:`~qkv.masks.Mask` hides keys from queries; a hidden position is *selected*
to ``-inf`` (``torch.where``; for the band alone ``tril_``/``triu_``, then a 0/-inf
bias), so NaN stored there does not leak. A block that the band (causal/window) hides
entirely is skipped without computing it, so causal attention costs about half; a block
the band leaves entirely visible and with no tensor mask is computed with no mask at all.
A block the band cuts is trimmed to the keys its queries can see and (one query head per
kv head) split into tiles of :data:`BAND_ROWS` queries, each trimmed to its own keys
(``Blocks.unit_tiles``), with the band applied only to the key columns where it hides
something. Tensor masks are sliced per block with :meth:`Mask.block`; size-1
(broadcast) dimensions stay size 1. A query that sees no key gets output 0, ``lse = -inf``
and zero gradients.

GQA: ``q (B, Hq, Lq, D)`` is viewed as ``(B, Hkv, G, Lq, D)``; the ``G`` query heads of a
key/value head are stacked along the rows of one matrix product with that head's keys, so
``k`` and ``v`` are never repeated. Low precision: float16/bfloat16 inputs are computed in
float32 (float64 inputs in float64) and the output is cast back.

Dropout is reproducible without storing a mask: the keep/drop decision for the weight of
query ``i`` on key ``j`` of batch row ``b`` and head ``h`` is a hash of ``(seed, b, h, i,
j)`` (:func:`dropout_keep`), so the backward regenerates exactly the forward's mask and the
mask does not depend on the block sizes. The seed is drawn once per call from the call's
generator (or torch's global RNG).

Building blocks (ring attention shards the keys over processes and builds on these):

* :func:`chunked_forward` ``(q, k, v, mask, scale) -> (out, lse)``: one partial attention,
  ``out`` in the compute dtype, ``lse (B, Hq, Lq)`` with ``-inf`` on rows that see no key;
* :func:`merge_partials` ``(out1, lse1, out2, lse2) -> (out, lse)``: the exact attention
  over the union of two disjoint key sets from the two partial attentions;
* :func:`chunked_backward` ``(q, k, v, dout, lse, delta, mask, scale) -> (dq, dk, dv)``:
  the gradients of the keys given, with ``lse`` and ``delta = (dout * out).sum(-1)`` of the
  *global* output, so partial gradients over key shards add up to the full gradient;
* :func:`chunked_attention`: the differentiable function that the backend runs.

Block sizes. :func:`plan_blocks` picks them per device and compute dtype so that one block
of scores stays small (:data:`BLOCK_ELEMENTS`; L2-sized on CPU; :data:`BLOCK_K` keys, or
:data:`BAND_BLOCK_K` with row tiles): tall blocks of one key/value head for long
sequences, several heads per block when they are short. Tests and experiments override
them with the :func:`block_sizes` context manager (``with block_sizes(64, 128): ...``)
or the ``block_q``/``block_k`` arguments.

CPU threads. The blocks of queries are spread over :data:`WORKERS` threads (default
``torch.get_num_threads()``), each running PyTorch operations single-threaded; the
caller's thread setting is restored afterwards. In the forward an idle thread takes the
next block (each block writes its own rows); in the backward the blocks are dealt
beforehand and the gradients of k and v are summed over the threads' shares in a fixed
order. So results never depend on thread timing.

Where it lives: :mod:`.planning` (block sizes), :mod:`.threads` (CPU threads),
:mod:`.dropout` (the hash), :mod:`.blocks` (one block of scores), :mod:`.core` (forward,
weights, backward, merge) and :mod:`.backend` (the autograd Function and the backend).
The settings :data:`WORKERS`, :data:`BLOCK_ELEMENTS`, :data:`BLOCK_K`,
:data:`BAND_ROWS` and :data:`BAND_BLOCK_K` are set here, on the package
(``qkv.kernels.chunked.WORKERS = 2``).
``backend="auto"`` prefers this backend when the reference would need more than
``qkv.kernels.REFERENCE_MEMORY_BUDGET`` bytes.
"""

from __future__ import annotations

import sys
import types

from . import planning, threads
from .backend import ChunkedBackend, chunked_attention
from .core import chunked_backward, chunked_forward, chunked_weights, merge_partials
from .dropout import draw_seed, dropout_keep
from .planning import (
    BAND_BLOCK_K,
    BAND_ROWS,
    BLOCK_ELEMENTS,
    BLOCK_K,
    Plan,
    block_sizes,
    plan_blocks,
)
from .threads import WORKERS

__all__ = [
    "BAND_BLOCK_K",
    "BAND_ROWS",
    "BLOCK_ELEMENTS",
    "BLOCK_K",
    "WORKERS",
    "ChunkedBackend",
    "Plan",
    "block_sizes",
    "chunked_attention",
    "chunked_backward",
    "chunked_forward",
    "chunked_weights",
    "draw_seed",
    "dropout_keep",
    "merge_partials",
    "plan_blocks",
]

# The settings are read where they are used (planning, threads); setting one on this package
# (``qkv.kernels.chunked.WORKERS = 2``, or pytest's monkeypatch) sets it there too.
_SETTINGS = {"WORKERS": threads, "BLOCK_ELEMENTS": planning, "BLOCK_K": planning,
             "BAND_ROWS": planning, "BAND_BLOCK_K": planning}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _SETTINGS:
            setattr(_SETTINGS[name], name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
