"""The backward kernels: FlashAttention-2's recomputation, split in three launches.

With ``P = softmax(S)`` recomputed from the saved log-sum-exp (``P = exp2(S' - lse)``, ``S'``
the scores in log2 units), the gradients of ``O = P V`` are

* ``dV = P^T dO`` and ``dP = dO V^T``;
* ``dS = P * (dP - delta)`` with ``delta_i = sum_j P_ij dP_ij = rowsum(dO_i * O_i)``;
* ``dQ = scale * dS K`` and ``dK = scale * dS^T Q``.

1. ``_delta_kernel``: ``delta = rowsum(dO * O)`` per query (float32).
2. ``_dkdv_kernel``: one program per key block of one kv head keeps ``K``, ``V`` and the
   ``dK``, ``dV`` accumulators resident and streams the query blocks of *every* query head
   that reads this kv head (GQA sums there, with no atomics and no repeated k/v).
3. ``_dq_kernel``: one program per query block keeps ``Q``, ``dO`` and ``dQ`` resident and
   streams the key blocks, exactly like the forward.

Both big kernels skip the blocks the band hides and mask only the band's edge blocks
(:func:`qkv.backends.triton.common.span`). Rows with no visible key have ``P = 0`` and so
zero gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune
from .common import (
    LOG2E,
    band_args,
    block_dim,
    load_lse,
    load_tile,
    span,
    store_tile,
    tile_and_head,
    visible,
)


@triton.jit(do_not_specialize=["H", "LQ"])
def _delta_kernel(O, DO, DELTA,
                  stride_oz, stride_oh, stride_om, stride_ok,
                  stride_dz, stride_dh, stride_dm, stride_dk,
                  H, LQ,
                  HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid ``(cdiv(Lq, BLOCK_M) * B * Hq,)``: DELTA (B, Hq, Lq) = rowsum(dO * O), fp32."""
    pid_m, pid_bh = tile_and_head(LQ, BLOCK_M, False)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    o = load_tile(O + b.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh, offs_m, offs_d,
                  stride_om, stride_ok, LQ, HEAD_DV, BLOCK_DV, True)
    do = load_tile(DO + b.to(tl.int64) * stride_dz + h.to(tl.int64) * stride_dh, offs_m,
                   offs_d, stride_dm, stride_dk, LQ, HEAD_DV, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, lo, hi, LQ, kv_len, qk_scale,
                 stride_qm, stride_qk, stride_dom, stride_dok, OFF, LEFT, RIGHT,
                 HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr):
    """Add the query blocks ``[lo, hi)`` of one query head to the resident (dK, dV)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(Q, offs_m, offs_dk, stride_qm, stride_qk, LQ,
                      HEAD_DK, BLOCK_DK, MASKED)  # (BLOCK_M, BLOCK_DK)
        lse = load_lse(LSE, offs_m, LQ)  # (BLOCK_M,) +inf for rows that see nothing
        st = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M) raw scores, transposed
        pt = tl.math.exp2(st * qk_scale - lse[None, :])  # P^T
        if MASKED:
            ok = visible(offs_m[None, :], offs_n[:, None], kv_len, OFF, LEFT, RIGHT,
                         HAS_LEFT, HAS_RIGHT)
            pt = tl.where(ok, pt, 0.0)
        do = load_tile(DO, offs_m, offs_dv, stride_dom, stride_dok, LQ,
                       HEAD_DV, BLOCK_DV, MASKED)  # (BLOCK_M, BLOCK_DV)
        dv = tl.dot(pt.to(do.dtype), do, dv)  # (BLOCK_N, BLOCK_DV)
        if MASKED:
            delta = tl.load(DELTA + offs_m, mask=offs_m < LQ, other=0.0)
        else:
            delta = tl.load(DELTA + offs_m)
        dpt = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        dst = pt * (dpt - delta[None, :])  # dS^T, unscaled
        dk = tl.dot(dst.to(q.dtype), q, dk)  # (BLOCK_N, BLOCK_DK)
    return dk, dv


@triton.jit(do_not_specialize=["HQ", "HKV", "LQ", "LK", "OFF", "LEFT", "RIGHT", "GROUPS"])
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, LENGTHS,
                 stride_qz, stride_qh, stride_qm, stride_qk,
                 stride_kz, stride_kh, stride_kn, stride_kk,
                 stride_vz, stride_vh, stride_vn, stride_vk,
                 stride_doz, stride_doh, stride_dom, stride_dok,
                 stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                 stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                 HQ, HKV, LQ, LK, scale, qk_scale, OFF, LEFT, RIGHT,
                 GROUPS,
                 HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Grid ``(cdiv(Lk, BLOCK_N) * B * Hkv,)``: dK (B, Hkv, Lk, Dk), dV (B, Hkv, Lk, Dv)."""
    pid_n, pid_bh = tile_and_head(LK, BLOCK_N, False)  # the same split, over key tiles
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    kv_len = tl.minimum(tl.load(LENGTHS + b), LK) if HAS_LENGTHS else LK
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    K += b.to(tl.int64) * stride_kz + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vz + kvh.to(tl.int64) * stride_vh
    k = load_tile(K, offs_n, offs_dk, stride_kn, stride_kk, kv_len,
                  HEAD_DK, BLOCK_DK, True)  # (BLOCK_N, BLOCK_DK), resident
    v = load_tile(V, offs_n, offs_dv, stride_vn, stride_vk, kv_len,
                  HEAD_DV, BLOCK_DV, True)  # (BLOCK_N, BLOCK_DV), resident
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # The query range that sees these keys: the band seen from the key side (a key j is
    # visible to query i iff j - OFF - RIGHT <= i <= j - OFF + LEFT). Keys at or past
    # kv_len see no query; their gradients stay 0.
    start, full_lo, full_hi, end = span(n0, tl.minimum(n0 + BLOCK_N, kv_len), LQ,
                                        -OFF, RIGHT, LEFT, HAS_RIGHT, HAS_LEFT, BLOCK_M)
    for g in range(0, GROUPS):  # every query head that reads this kv head
        h = kvh * GROUPS + g
        Qh = Q + b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_doz + h.to(tl.int64) * stride_doh
        row = (b.to(tl.int64) * HQ + h) * LQ
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row, DELTA + row, offs_n,
                              start, full_lo, LQ, kv_len, qk_scale, stride_qm, stride_qk,
                              stride_dom, stride_dok, OFF, LEFT, RIGHT, HEAD_DK, HEAD_DV,
                              BLOCK_DK, BLOCK_DV, BLOCK_M, HAS_LEFT, HAS_RIGHT, True)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row, DELTA + row, offs_n,
                              full_lo, full_hi, LQ, kv_len, qk_scale, stride_qm, stride_qk,
                              stride_dom, stride_dok, OFF, LEFT, RIGHT, HEAD_DK, HEAD_DV,
                              BLOCK_DK, BLOCK_DV, BLOCK_M, HAS_LEFT, HAS_RIGHT, False)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row, DELTA + row, offs_n,
                              full_hi, end, LQ, kv_len, qk_scale, stride_qm, stride_qk,
                              stride_dom, stride_dok, OFF, LEFT, RIGHT, HEAD_DK, HEAD_DV,
                              BLOCK_DK, BLOCK_DV, BLOCK_M, HAS_LEFT, HAS_RIGHT, True)

    real = (offs_n < kv_len)[:, None]  # padded keys get exactly 0, whatever the tile held
    dk = tl.where(real, dk * scale, 0.0)
    dv = tl.where(real, dv, 0.0)
    store_tile(DK + b.to(tl.int64) * stride_dkz + kvh.to(tl.int64) * stride_dkh,
               dk.to(DK.dtype.element_ty), offs_n, offs_dk, stride_dkn, stride_dkk, LK,
               HEAD_DK, BLOCK_DK)
    store_tile(DV + b.to(tl.int64) * stride_dvz + kvh.to(tl.int64) * stride_dvh,
               dv.to(DV.dtype.element_ty), offs_n, offs_dv, stride_dvn, stride_dvk, LK,
               HEAD_DV, BLOCK_DV)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, K, V, offs_m, lo, hi, kv_len, qk_scale,
               stride_kn, stride_kk, stride_vn, stride_vk, OFF, LEFT, RIGHT,
               HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr):
    """Add the key blocks ``[lo, hi)`` to the resident dQ."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K, offs_n, offs_dk, stride_kn, stride_kk, kv_len,
                      HEAD_DK, BLOCK_DK, MASKED)  # (BLOCK_N, BLOCK_DK)
        v = load_tile(V, offs_n, offs_dv, stride_vn, stride_vk, kv_len,
                      HEAD_DV, BLOCK_DV, MASKED)  # (BLOCK_N, BLOCK_DV)
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            ok = visible(offs_m[:, None], offs_n[None, :], kv_len, OFF, LEFT, RIGHT,
                         HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)  # (BLOCK_M, BLOCK_DK)
    return dq


@triton.jit(do_not_specialize=["H", "LQ", "LK", "OFF", "LEFT", "RIGHT", "GROUPS"])
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LENGTHS,
               stride_qz, stride_qh, stride_qm, stride_qk,
               stride_kz, stride_kh, stride_kn, stride_kk,
               stride_vz, stride_vh, stride_vn, stride_vk,
               stride_doz, stride_doh, stride_dom, stride_dok,
               stride_dqz, stride_dqh, stride_dqm, stride_dqk,
               H, LQ, LK, scale, qk_scale, OFF, LEFT, RIGHT,
               GROUPS,
               HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Grid ``(cdiv(Lq, BLOCK_M) * B * Hq,)``: dQ (B, Hq, Lq, Dk)."""
    pid_m, pid_bh = tile_and_head(LQ, BLOCK_M, HAS_RIGHT)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS
    kv_len = tl.minimum(tl.load(LENGTHS + b), LK) if HAS_LENGTHS else LK
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    K += b.to(tl.int64) * stride_kz + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vz + kvh.to(tl.int64) * stride_vh
    q = load_tile(Q + b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh, offs_m, offs_dk,
                  stride_qm, stride_qk, LQ, HEAD_DK, BLOCK_DK, True)  # (BLOCK_M, BLOCK_DK)
    do = load_tile(DO + b.to(tl.int64) * stride_doz + h.to(tl.int64) * stride_doh, offs_m,
                   tl.arange(0, BLOCK_DV), stride_dom, stride_dok, LQ,
                   HEAD_DV, BLOCK_DV, True)  # (BLOCK_M, BLOCK_DV)
    row = pid_bh.to(tl.int64) * LQ
    lse = load_lse(LSE + row, offs_m, LQ)  # (BLOCK_M,)
    delta = tl.load(DELTA + row + offs_m, mask=offs_m < LQ, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)

    start, full_lo, full_hi, end = span(m0, tl.minimum(m0 + BLOCK_M, LQ), kv_len,
                                        OFF, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, offs_m, start, full_lo, kv_len, qk_scale,
                    stride_kn, stride_kk, stride_vn, stride_vk, OFF, LEFT, RIGHT,
                    HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, True)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, offs_m, full_lo, full_hi, kv_len, qk_scale,
                    stride_kn, stride_kk, stride_vn, stride_vk, OFF, LEFT, RIGHT,
                    HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, False)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, offs_m, full_hi, end, kv_len, qk_scale,
                    stride_kn, stride_kk, stride_vn, stride_vk, OFF, LEFT, RIGHT,
                    HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, True)
    store_tile(DQ + b.to(tl.int64) * stride_dqz + h.to(tl.int64) * stride_dqh,
               (dq * scale).to(DQ.dtype.element_ty), offs_m, offs_dk, stride_dqm, stride_dqk,
               LQ, HEAD_DK, BLOCK_DK)


def backward(do, q, k, v, out, lse, lengths, scale: float, left: int | None,
             right: int | None):
    """Gradients of :func:`qkv.backends.triton.fwd.forward`'s output.

    Args:
        do: (B, Hq, Lq, Dv), the gradient of ``out``; any strides (even 0).
        q, k, v, lengths, scale, left, right: as given to the forward.
        out: (B, Hq, Lq, Dv) and lse: (B, Hq, Lq) float32, as the forward returned them.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``.
    """
    b, hq, lq, dk_ = q.shape
    hkv, lk, dv_ = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, Hq, Lq, Dk)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # (B, Hkv, Lk, Dk)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)  # (B, Hkv, Lk, Dv)
    if lq == 0 or b * hq == 0:  # no query: nothing flows back
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)  # (B, Hq, Lq)
    bdk, bdv = block_dim(dk_), block_dim(dv_)
    band = band_args(lq, lk, left, right)
    lens = lengths if lengths is not None else delta
    common = dict(GROUPS=hq // hkv, HEAD_DK=dk_, HEAD_DV=dv_, BLOCK_DK=bdk, BLOCK_DV=bdv,
                  HAS_LEFT=band["HAS_LEFT"], HAS_RIGHT=band["HAS_RIGHT"],
                  HAS_LENGTHS=lengths is not None)
    bands = (band["OFF"], band["LEFT"], band["RIGHT"])
    shape_class = (str(q.device), q.dtype, dk_, dv_, band["HAS_LEFT"], band["HAS_RIGHT"],
                   autotune.bucket(lq), autotune.bucket(lk), autotune.bucket(b * hq),
                   hq // hkv > 1)

    block = 64
    _delta_kernel[(triton.cdiv(lq, block) * b * hq,)](
        out, do, delta, *out.stride(), *do.stride(), hq, lq,
        HEAD_DV=dv_, BLOCK_DV=bdv, BLOCK_M=block,
    )

    if lk > 0:
        def run_dkdv(cfg: autotune.Config) -> None:
            _dkdv_kernel[(triton.cdiv(lk, cfg.block_n) * b * hkv,)](
                q, k, v, do, lse, delta, dk, dv, lens,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
                *dv.stride(), hq, hkv, lq, lk, scale, scale * LOG2E, *bands,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )

        cands = autotune.candidates("dkdv", max(bdk, bdv), q.device)
        run_dkdv(autotune.choose(("dkdv", *shape_class), cands, run_dkdv))

    def run_dq(cfg: autotune.Config) -> None:
        _dq_kernel[(triton.cdiv(lq, cfg.block_m) * b * hq,)](
            q, k, v, do, lse, delta, dq, lens,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            hq, lq, lk, scale, scale * LOG2E, *bands,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    cands = autotune.candidates("dq", max(bdk, bdv), q.device)
    run_dq(autotune.choose(("dq", *shape_class), cands, run_dq))
    return dq, dk, dv
