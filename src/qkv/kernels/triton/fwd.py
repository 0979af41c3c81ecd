"""The forward kernel: FlashAttention-2's online softmax with a resident query tile.

One program owns ``BLOCK_M`` queries of one (batch, head). It keeps them in registers,
streams the keys and values of the head's kv head (``h // GROUPS``: GQA/MQA read the shared
head, nothing is repeated) in blocks of ``BLOCK_N``, and carries three running quantities
per query row, all in float32:

* ``m``: the largest scaled score seen so far, in log2 units (``s * scale * log2(e)``);
* ``l``: the sum of ``exp2(score - m)`` over the keys seen so far;
* ``acc``: the sum of ``exp2(score - m) * v`` over the same keys.

When a new block raises the maximum from ``m`` to ``m'``, the old sums are rescaled by
``exp2(m - m')``. At the end ``out = acc / l`` and the log-sum-exp ``m + log2(l)`` is saved
(log2 units, ``-inf`` for a row that sees no key) for the backward and weights kernels.

Key blocks that the band (causal / window / key length) hides from the whole tile are never
visited; blocks visible to every query of the tile run without any mask; only the blocks on
the band's edges pay for the element-wise mask (:func:`qkv.kernels.triton.common.span`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune
from .common import (
    LOG2E,
    at_row,
    band_args,
    block_dim,
    launch,
    load_tile,
    span,
    store_tile,
    tile_and_head,
    visible,
)


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K, V, offs_m, lo, full_lo, full_hi, hi, kv_len, qk_scale,
                stride_kn, stride_kk, stride_vn, stride_vk,
                OFF, LEFT, RIGHT,
                HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Fold the key blocks ``[lo, hi)`` into the running (acc, l, m) of the query tile.

    Blocks in ``[full_lo, full_hi)`` are visible to every query of the tile and skip the
    mask; the others (the band's edges: a window's left side, the causal diagonal, the end
    of the keys) take a run-time branch that masks. One loop rather than three (edge,
    middle, edge): each loop's state costs registers, and three spill at D=128.
    """
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = tl.arange(0, BLOCK_N)
    # Pointers to the first block, then advanced by one block per step (an int32 step of
    # BLOCK_N rows; the pointer itself is 64-bit).
    Kb = at_row(K, lo, stride_kn)
    Vb = at_row(V, lo, stride_vn)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + rows
        k = load_tile(Kb, rows, offs_dk, stride_kn, stride_kk, kv_len - start_n,
                      HEAD_DK, BLOCK_DK, True)  # (BLOCK_N, BLOCK_DK)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) scores, log2 units
        if (start_n < full_lo) | (start_n >= full_hi):  # an edge block: mask
            ok = visible(offs_m[:, None], offs_n[None, :], kv_len, OFF, LEFT, RIGHT,
                         HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        # (The branch yields only s: Triton 3.6's software pipeliner fails on a branch
        # that also carries the row max and P.)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so
        # that exp2(-inf - (-inf)) never makes a NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)  # rescales the old sums (0 when m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(Vb, rows, offs_dv, stride_vn, stride_vk, kv_len - start_n,
                      HEAD_DV, BLOCK_DV, True)  # (BLOCK_N, BLOCK_DV)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # (BLOCK_M, BLOCK_DV)
        m_i = m_new
        Kb += BLOCK_N * stride_kn
        Vb += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["H", "LQ", "LK", "OFF", "LEFT", "RIGHT", "GROUPS"])
def _fwd_kernel(Q, K, V, O, LSE, LENGTHS,
                stride_qz, stride_qh, stride_qm, stride_qk,
                stride_kz, stride_kh, stride_kn, stride_kk,
                stride_vz, stride_vh, stride_vn, stride_vk,
                stride_oz, stride_oh, stride_om, stride_ok,
                H, LQ, LK, qk_scale, OFF, LEFT, RIGHT,
                GROUPS,
                HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Grid ``(cdiv(Lq, BLOCK_M) * B * Hq,)``. Q (B, Hq, Lq, Dk), K (B, Hkv, Lk, Dk),
    V (B, Hkv, Lk, Dv) -> O (B, Hq, Lq, Dv) and LSE (B, Hq, Lq) float32, contiguous."""
    pid_m, pid_bh = tile_and_head(LQ, BLOCK_M, HAS_RIGHT)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS  # GQA/MQA: the kv head this query head reads
    kv_len = tl.minimum(tl.load(LENGTHS + b), LK) if HAS_LENGTHS else LK
    Q += b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kz + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vz + kvh.to(tl.int64) * stride_vh
    O += b.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh
    LSE += pid_bh.to(tl.int64) * LQ

    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    q = load_tile(at_row(Q, m0, stride_qm), rows, tl.arange(0, BLOCK_DK), stride_qm, stride_qk,
                  LQ - m0, HEAD_DK, BLOCK_DK, True)  # (BLOCK_M, BLOCK_DK), resident
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    start, full_lo, full_hi, end = span(m0, tl.minimum(m0 + BLOCK_M, LQ), kv_len,
                                        OFF, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, offs_m, start, full_lo, full_hi, end,
                                kv_len, qk_scale, stride_kn, stride_kk, stride_vn, stride_vk,
                                OFF, LEFT, RIGHT, HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV,
                                BLOCK_N, HAS_LEFT, HAS_RIGHT)

    # False only for a row that sees no key (output 0, lse -inf); a NaN sum (a NaN or +inf
    # score) is True, so that row's output and lse are NaN, as on every backend.
    seen = l_i != 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(LSE + offs_m, lse, mask=offs_m < LQ)
    store_tile(at_row(O, m0, stride_om), out.to(O.dtype.element_ty), rows,
               tl.arange(0, BLOCK_DV), stride_om, stride_ok, LQ - m0, HEAD_DV, BLOCK_DV)


def forward(q, k, v, lengths, scale: float, left: int | None, right: int | None):
    """Run the forward kernel.

    Args:
        q: (B, Hq, Lq, Dk); k: (B, Hkv, Lk, Dk); v: (B, Hkv, Lk, Dv); any strides.
        lengths: int32 (B,) keys per batch row (keys at or past it are hidden), or None.
        scale: > 0, multiplies the scores.
        left, right: the band (None = unbounded side); causal is ``right = 0``.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in q's dtype and ``lse (B, Hq, Lq)`` float32 in log2 units
        (``log2(sum_j exp2(s_j))`` of the scaled scores ``s * log2(e)``; ``-inf`` where a
        query sees no key).
    """
    b, hq, lq, dk = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(b, hq, lq, dv, dtype=q.dtype, device=q.device)  # (B, Hq, Lq, Dv)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)  # (B, Hq, Lq)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    # One padded width for both head dims: with Triton 3.6 on sm_90 (an H200) the forward
    # gave wrong outputs, and read out of bounds in bfloat16, when the two differed
    # (D=40, Dv=24: 64 and 32), at every tile tried, while the interpreter was right.
    bdk = bdv = max(block_dim(dk), block_dim(dv))
    band = band_args(lq, lk, left, right)

    def run(cfg: autotune.Config) -> None:
        grid = (triton.cdiv(lq, cfg.block_m) * b * hq,)
        launch(_fwd_kernel, grid,
            q, k, v, out, lse, lengths if lengths is not None else lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            hq, lq, lk, scale * LOG2E, band["OFF"], band["LEFT"], band["RIGHT"],
            GROUPS=hq // hkv, HEAD_DK=dk, HEAD_DV=dv, BLOCK_DK=bdk, BLOCK_DV=bdv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            HAS_LEFT=band["HAS_LEFT"], HAS_RIGHT=band["HAS_RIGHT"],
            HAS_LENGTHS=lengths is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    arch = autotune.arch_of(q.device)
    key = ("fwd", str(q.device), q.dtype, dk, dv, band["HAS_LEFT"], band["HAS_RIGHT"],
           autotune.bucket(lq), autotune.bucket(lk), autotune.bucket(b * hq))
    run(autotune.choose(key, autotune.candidates("fwd", max(bdk, bdv), arch), run))
    return out, lse
