"""Ring attention: exact self-attention over a sequence sharded across processes.

Each of the ``N`` ranks of a process group holds ``L/N`` positions of one sequence: its
queries ``q (B, Hq, L/N, D)`` and the keys/values ``k, v (B, Hkv, L/N, D|Dv)`` of the same
positions. The key/value shards travel around the ring (rank ``r`` sends to ``r+1`` and
receives from ``r-1``) with ``torch.distributed`` batched point-to-point operations; after
``N`` steps every rank has seen every shard. At step ``s`` rank ``r`` holds the shard of
rank ``src = r - s (mod N)``:

1. it posts the transfer of that shard to ``r+1`` and of the next one from ``r-1``;
2. meanwhile it computes the attention of its queries over the shard it holds with the
   chunked backend (:func:`~qkv.kernels.chunked.chunked_forward`), which returns the
   partial output and its log-sum-exp;
3. it merges the partial into its running output exactly
   (:func:`~qkv.kernels.chunked.merge_partials`), then waits for the transfer.

So memory per rank is O(L/N) (a few shards plus the chunked backend's blocks) and the
transfer of the next shard overlaps the computation on the current one.

The backward (an :class:`torch.autograd.Function`) runs the same ring again. Every block's
gradient is computed by :func:`~qkv.kernels.chunked.chunked_backward` with the *merged*
``lse`` and ``delta = (dout * out).sum(-1)`` of the full output, so partial gradients over
key shards add up to the full gradient. ``dq`` stays on its rank; the partial ``dk, dv`` of a
shard are accumulated in a buffer that follows the shard around the ring (one hop behind the
keys, sent while the next block is computed) and, after the last step, one more hop brings
it home: each rank ends with the gradients of its own keys and values.

Layouts. With ``layout="contiguous"`` rank ``r`` holds positions ``[r L/N, (r+1) L/N)``.
Causal attention then leaves rank 0 almost idle (it sees only its own shard) while rank
``N-1`` sees all of them. With ``layout="zigzag"`` the sequence is cut into ``2N`` chunks
and rank ``r`` holds chunks ``r`` and ``2N-1-r``: every rank then computes the same amount
of causal attention at every step (one diagonal block at step 0, then half a shard against
a full shard). :func:`~qkv.distributed.shard_sequence`, :func:`~qkv.distributed.unshard_sequence`
and :func:`~qkv.distributed.shard_positions` (:mod:`qkv.distributed.sharding`) convert
between a full sequence and either layout.

Causal. The global sequence has ``Lq == Lk``, so bottom-right alignment is the plain
diagonal: position ``i`` sees positions ``j <= i``. For a pair (query shard, key shard) a
block is entirely visible (``Mask(lq, lk)``), diagonal-causal (``Mask(l, l, causal=True,
right=0)``) or skipped.

Faults. Shards of unequal length (or any other disagreement between the ranks' calls) are
found by one small ``all_gather`` of the shapes at the start of the call and raise the same
``ValueError`` on every rank. A rank that dies closes its connections: its neighbours' waits
fail at once, and the ring error propagates to the others as they exit; a rank that stops
calling (stuck, or on another code path) makes the others' waits give up after ``timeout``
seconds (default: the process group's timeout, ``init_process_group(timeout=...)``). In both
cases the others raise a :class:`RuntimeError` that names the rank, the step and the peer.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.chunked import chunked_backward, chunked_forward, merge_partials
from ..masks import Mask
from ..validate import check_qkv
from .sharding import LAYOUTS

__all__ = ["RingStats", "record_ring_stats", "ring_attention"]

# Message tags: key/value shards and gradient accumulators never share a tag, so a transfer
# of one kind can never be matched with the other (gloo matches by peer and tag).
_TAG_KV, _TAG_GRAD = 17, 18


# ---- instrumentation -------------------------------------------------------------------------
@dataclass
class RingStats:
    """Where the time of ring attention went on this rank (see :func:`record_ring_stats`).

    ``compute_s``: seconds in the local block computations and merges; ``wait_s``: seconds
    blocked on transfers that had not finished when the computation did (communication
    that the computation did not hide); ``bytes_sent``: payload sent by this rank;
    ``steps``: ring steps taken (forward and backward).
    """

    compute_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    steps: int = 0


_stats: RingStats | None = None


@contextlib.contextmanager
def record_ring_stats() -> Iterator[RingStats]:
    """Accumulate :class:`RingStats` over every ring attention call (forward and backward)
    inside the ``with`` block; yields the stats object it fills."""
    global _stats
    saved, _stats = _stats, RingStats()
    try:
        yield _stats
    finally:
        _stats = saved


class _Clock:
    """Adds the seconds of a ``with`` block to one field of the active stats, if any."""

    def __init__(self, field: str):
        self.field = field

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if _stats is not None:
            setattr(_stats, self.field, getattr(_stats, self.field)
                    + time.perf_counter() - self.t0)


# ---- the ring --------------------------------------------------------------------------------
class _Ring:
    """The ranks of a process group in ring order, and the transfers between neighbours."""

    def __init__(self, group, timeout: float | None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size) \
            if group is not None else (self.rank + 1) % self.size
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size) \
            if group is not None else (self.rank - 1) % self.size
        self.timeout = None if timeout is None else datetime.timedelta(seconds=timeout)

    def exchange(self, send: Tensor, recv: Tensor, *, tag: int, what: str) -> _Transfer:
        """Post: ``send`` goes to the next rank, ``recv`` is filled by the previous one."""
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise self.error(what, e) from e
        if _stats is not None:
            _stats.bytes_sent += send.numel() * send.element_size()
        return _Transfer(self, works, what)

    def error(self, what: str, cause: BaseException) -> RuntimeError:
        waited = ("the process group's timeout (init_process_group(timeout=...))"
                  if self.timeout is None else f"timeout={self.timeout.total_seconds():g} s")
        return RuntimeError(
            f"ring attention failed on rank {self.rank} of {self.size} while {what} (sending "
            f"to global rank {self.next}, receiving from global rank {self.prev}): a rank of "
            f"the ring has died, or stopped calling ring_attention with the others (every "
            f"rank must call it, forward and backward, in the same order). Waits give up "
            f"after {waited}. Check the other ranks' logs. Cause: {cause}")


class _Transfer:
    """Posted transfers; :meth:`wait` blocks until they are done (or fail clearly)."""

    def __init__(self, ring: _Ring, works, what: str):
        self.ring, self.works, self.what = ring, works, what

    def wait(self) -> None:
        with _Clock("wait_s"):
            try:
                for w in self.works:
                    if self.ring.timeout is None:
                        w.wait()
                    else:
                        w.wait(self.ring.timeout)
            except RuntimeError as e:
                raise self.ring.error(self.what, e) from e


# ---- which blocks a (query shard, key shard) pair needs -------------------------------------
def _pairs(layout: str, causal: bool, rank: int, src: int, n: int):
    """Blocks of queries of ``rank`` x keys of ``src``, each shard ``n`` long.

    Returns ``[(query rows, key rows, Mask)]`` with the rows as slices of the local shards;
    an empty list when the causal rule hides the whole pair.
    """
    every = slice(0, n)
    if not causal:
        return [(every, every, Mask(n, n))]
    if src == rank:  # positions are increasing within a shard in both layouts
        return [(every, every, Mask(n, n, causal=True, right=0))]
    if layout == "contiguous":
        return [(every, every, Mask(n, n))] if src < rank else []
    # zigzag: rank r holds chunks r (first half) and 2N-1-r (second half), c = n/2 each.
    c = n // 2
    if src < rank:  # key chunk src precedes both query chunks; chunk 2N-1-src follows both
        return [(every, slice(0, c), Mask(n, c))]
    # src > rank: both key chunks follow query chunk r and precede query chunk 2N-1-r
    return [(slice(c, n), every, Mask(c, n))]


def _pack(k: Tensor, v: Tensor) -> Tensor:
    """k and v in one flat buffer, so that a shard travels as one message."""
    return torch.cat([k.reshape(-1), v.reshape(-1)])  # (numel(k) + numel(v),)


def _unpack(buf: Tensor, k_shape, v_shape) -> tuple[Tensor, Tensor]:
    nk = math.prod(k_shape)
    return buf[:nk].view(k_shape), buf[nk:].view(v_shape)


# ---- forward and backward ----------------------------------------------------------------------
def _ring_forward(ring: _Ring, q, k, v, *, causal, layout, scale, blocks):
    """``out (B, Hq, n, Dv)`` and ``lse (B, Hq, n)`` in the compute dtype, over all shards."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hq, n, _ = q.shape
    out = torch.zeros(b, hq, n, v.shape[-1], dtype=ct, device=q.device)  # (B, Hq, n, Dv)
    lse = torch.full((b, hq, n), float("-inf"), dtype=ct, device=q.device)  # (B, Hq, n)
    kv = _pack(k, v)
    spare = torch.empty_like(kv) if ring.size > 1 else None
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        pending = None
        if step < ring.size - 1:
            pending = ring.exchange(kv, spare, tag=_TAG_KV,
                                    what=f"passing key/value shards (forward step {step})")
        with _Clock("compute_s"):
            ks, vs = _unpack(kv, k.shape, v.shape)
            for rows, cols, mask in _pairs(layout, causal, ring.rank, src, n):
                o, l = chunked_forward(q[:, :, rows], ks[:, :, cols], vs[:, :, cols], mask,
                                       scale, block_q=blocks[0], block_k=blocks[1])
                out[:, :, rows], lse[:, :, rows] = merge_partials(
                    out[:, :, rows], lse[:, :, rows], o, l)
        if pending is not None:
            pending.wait()
            kv, spare = spare, kv
        if _stats is not None:
            _stats.steps += 1
    return out, lse


def _ring_backward(ring: _Ring, q, k, v, out, lse, dout, *, causal, layout, scale, blocks):
    """``dq, dk, dv`` of this rank's shards, in the compute dtype."""
    ct = lse.dtype
    n = q.shape[2]
    delta = (dout.to(ct) * out.to(ct)).sum(dim=-1)  # (B, Hq, n), from the full output
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)  # (B, Hq, n, D)
    kv = _pack(k, v)
    spare = torch.empty_like(kv) if ring.size > 1 else None
    # Two gradient buffers take turns: the accumulator of the shard held now (received
    # from r-1, this rank's part added, sent to r+1) and the one being received.
    acc = torch.zeros(kv.numel(), dtype=ct, device=q.device)  # (numel(k) + numel(v),)
    incoming = torch.empty_like(acc) if ring.size > 1 else None
    arriving = None  # the exchange that brings the accumulator of the next shard
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        pending_kv = None
        if step < ring.size - 1:
            pending_kv = ring.exchange(kv, spare, tag=_TAG_KV,
                                       what=f"passing key/value shards (backward step {step})")
        with _Clock("compute_s"):
            ks, vs = _unpack(kv, k.shape, v.shape)
            parts = []
            for rows, cols, mask in _pairs(layout, causal, ring.rank, src, n):
                dq_p, dk_p, dv_p = chunked_backward(
                    q[:, :, rows], ks[:, :, cols], vs[:, :, cols], dout[:, :, rows],
                    lse[:, :, rows], delta[:, :, rows], mask, scale,
                    block_q=blocks[0], block_k=blocks[1])
                dq[:, :, rows] += dq_p
                parts.append((cols, dk_p, dv_p))
        if arriving is not None:  # what ranks src .. r-1 contributed to this shard
            arriving.wait()
            acc, incoming = incoming, acc
        with _Clock("compute_s"):
            dks, dvs = _unpack(acc, k.shape, v.shape)
            for cols, dk_p, dv_p in parts:
                dks[:, :, cols] += dk_p
                dvs[:, :, cols] += dv_p
            del parts
        if pending_kv is not None:
            pending_kv.wait()
            kv, spare = spare, kv
        if ring.size > 1:  # pass the accumulator on; after the last step it reaches home
            arriving = ring.exchange(acc, incoming, tag=_TAG_GRAD,
                                     what=f"passing key/value gradients (backward step {step})")
        if _stats is not None:
            _stats.steps += 1
    if arriving is not None:
        arriving.wait()
        acc = incoming
    dk, dv = _unpack(acc, k.shape, v.shape)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    """out of ring attention; the backward runs the ring again and returns this rank's
    gradients."""

    @staticmethod
    def forward(ctx, q, k, v, ring, causal, layout, scale, blocks):
        out, lse = _ring_forward(ring, q, k, v, causal=causal, layout=layout, scale=scale,
                                 blocks=blocks)
        out = out.to(q.dtype)  # (B, Hq, n, Dv)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.opts = ring, {"causal": causal, "layout": layout, "scale": scale,
                                    "blocks": blocks}
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.ring, q, k, v, out, lse, dout, **ctx.opts)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


# ---- the public function -------------------------------------------------------------------------
def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False,
                   layout: str = "contiguous", scale: float | None = None,
                   timeout: float | None = None, check: bool = True,
                   block_q: int | None = None, block_k: int | None = None) -> Tensor:
    """Exact self-attention of one sequence sharded over the ranks of ``group``.

    Every rank of the group calls this with its own shard, in the same order; the result
    equals :func:`qkv.attention` on the full sequence, restricted to the rank's positions
    (and so do the gradients, when every rank runs the backward).

    Args:
        q: this rank's queries ``(B, Hq, L/N, D)``.
        k: this rank's keys ``(B, Hkv, L/N, D)``; ``Hq`` must be a multiple of ``Hkv``
            (GQA/MQA).
        v: this rank's values ``(B, Hkv, L/N, Dv)``.
        group: the ``torch.distributed`` process group of the ring (default: the world);
            ``torch.distributed.init_process_group`` must have been called.
        causal: position ``i`` sees positions ``j <= i`` of the full sequence (global
            ``Lq == Lk``, so bottom-right alignment is the plain diagonal). Nothing is hidden
            otherwise.
        layout: ``"contiguous"`` (rank ``r`` holds positions ``r L/N .. (r+1) L/N - 1``) or
            ``"zigzag"`` (the sequence cut into ``2N`` chunks, rank ``r`` holds chunks ``r``
            and ``2N-1-r``, so ``L/N`` must be even); see :func:`shard_sequence`.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        timeout: seconds a transfer may take before the call gives up with a RuntimeError
            (default: the process group's timeout).
        check: gather every rank's shapes and options first (one small ``all_gather``) and
            raise the same ValueError on every rank when they disagree, e.g. shards of
            unequal length. Without it such a mistake ends in a transfer error or a hang.
        block_q, block_k: block sizes of the chunked backend (default: its own choice).

    Returns:
        ``out (B, Hq, L/N, Dv)`` in the input dtype, for this rank's positions. Scores and
        softmax run in float32 (float64 for float64 inputs), gradients travel in that dtype.

    Raises:
        ValueError/TypeError on bad input (on every rank, when ``check``); RuntimeError when
        a rank dies or stops taking part (see the module docstring).
    """
    _check_local(q, k, v, causal=causal, layout=layout, scale=scale, timeout=timeout)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs torch.distributed: call "
                           "torch.distributed.init_process_group(...) on every rank first "
                           "(gloo on CPU, nccl on GPUs), or launch with torchrun")
    ring = _Ring(group, timeout)
    if check:
        _check_ranks(ring, q, k, v, causal=causal, layout=layout, scale=scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _RingAttention.apply(q, k, v, ring, causal, layout, float(scale), (block_q, block_k))


def _check_local(q, k, v, *, causal, layout, scale, timeout) -> None:
    """Everything that can be checked without talking to the other ranks."""
    check_qkv(q, k, v, dims=4)
    n = q.shape[2]
    if k.shape[2] != n:
        raise ValueError(f"q holds {n} positions but k holds {k.shape[2]}: ring attention is "
                         "self-attention over one sharded sequence, so each rank's queries "
                         "and keys are the same positions. Fix: shard q, k and v alike")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout='zigzag' needs an even shard length (two chunks of L/2N); "
                         f"this rank holds {n} positions. Fix: pad the sequence to a multiple "
                         "of 2N, or use layout='contiguous'")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}")


_FIELDS = ("batch", "query heads", "key heads", "shard length", "head dim", "value dim",
           "dtype", "causal", "layout", "scale")


def _check_ranks(ring: _Ring, q, k, v, *, causal, layout, scale) -> None:
    """All-gather every rank's shapes and options; raise the same ValueError everywhere."""
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    mine = [q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], v.shape[3],
            dtypes.index(q.dtype) if q.dtype in dtypes else -1, int(causal),
            LAYOUTS.index(layout), -1 if scale is None else hash(float(scale)) & 0xFFFFFFFF]
    on_gpu = dist.get_backend(ring.group) == "nccl"
    dev = q.device if on_gpu else torch.device("cpu")
    t = torch.tensor(mine, dtype=torch.int64, device=dev)  # (F,)
    every = [torch.empty_like(t) for _ in range(ring.size)]
    try:
        work = dist.all_gather(every, t, group=ring.group, async_op=True)
        with _Clock("wait_s"):
            if ring.timeout is None:
                work.wait()
            else:
                work.wait(ring.timeout)
    except RuntimeError as e:
        raise ring.error("comparing the ranks' shapes (all_gather)", e) from e
    table = torch.stack(every).cpu().tolist()  # (N, F)
    lengths = [row[3] for row in table]
    if len(set(lengths)) > 1:
        raise ValueError(
            f"ring attention needs shards of equal length on every rank; got lengths "
            f"{lengths} (rank i holds lengths[i] positions). Fix: pad the sequence to a "
            f"multiple of N (2N for zigzag) before sharding it with shard_sequence; with "
            f"causal=True padding at the end does not change the other positions' outputs")
    for f, name in enumerate(_FIELDS):
        values = [row[f] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"the ranks disagree on the {name} of their ring_attention call "
                             f"(per rank: {values}); every rank must pass shards of the same "
                             f"shapes, dtype and options")
