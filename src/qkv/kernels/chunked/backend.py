"""The chunked backend: the autograd Function over the core and the backend class."""

from __future__ import annotations

import torch
from torch import Tensor

from ...masks import Mask
from ..base import Backend, Call
from .core import chunked_backward, chunked_forward, chunked_weights
from .dropout import draw_seed

__all__ = ["ChunkedBackend", "chunked_attention"]


# ---- autograd ------------------------------------------------------------------------------------
class _ChunkedAttention(torch.autograd.Function):
    """out (and weights) of chunked attention; the backward recomputes the blocks."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, dropout, seed, return_weights, blocks):
        opts = {"dropout": dropout, "seed": seed, "block_q": blocks[0], "block_k": blocks[1]}
        out_ct, (row_max, inv_sum) = chunked_forward(q, k, v, mask, scale, stats=True, **opts)
        out = out_ct.to(q.dtype)  # (B, Hq, Lq, Dv)
        weights = None
        if return_weights:
            b, hq, lq, _ = q.shape
            weights = torch.empty(b, hq, lq, k.shape[2], dtype=q.dtype, device=q.device)
            chunked_weights(q, k, mask, scale, (row_max, inv_sum), out=weights, **opts)
        # delta = (dout * out).sum(-1) from the unrounded output: for float16/bfloat16 the
        # rounded one would cost the gradients more than the inputs' own rounding does.
        ctx.save_for_backward(q, k, v, out_ct, row_max, inv_sum, weights)
        ctx.mask, ctx.scale, ctx.opts, ctx.bias = mask, scale, opts, bias
        ctx.set_materialize_grads(False)
        return (out, weights) if return_weights else out

    @staticmethod
    def backward(ctx, dout, dweights=None):
        q, k, v, out, row_max, inv_sum, weights = ctx.saved_tensors
        ct = row_max.dtype
        if dout is None:
            dout = torch.zeros_like(out)
        delta = (dout.to(ct) * out.to(ct)).sum(dim=-1)  # (B, Hq, Lq)
        if dweights is not None:
            delta += _row_dot(dweights, weights, ct)
        dbias = None
        if ctx.bias is not None and ctx.needs_input_grad[3]:
            dbias = torch.zeros(ctx.bias.shape, dtype=ct, device=q.device)
        dq, dk, dv = chunked_backward(q, k, v, dout, (row_max, inv_sum), delta, ctx.mask,
                                      ctx.scale,
                                      dweights=dweights, dbias=dbias, **ctx.opts)
        if dbias is not None:
            dbias = dbias.to(ctx.bias.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias,
                None, None, None, None, None, None)


def _row_dot(a: Tensor, b: Tensor, ct: torch.dtype, rows: int = 1024) -> Tensor:
    """``(a * b).sum(-1)`` of two (B, H, Lq, Lk) tensors, ``rows`` queries at a time."""
    out = torch.empty(a.shape[:-1], dtype=ct, device=a.device)  # (B, H, Lq)
    for r0 in range(0, a.shape[2], rows):
        sl = slice(r0, r0 + rows)
        out[:, :, sl] = (a[:, :, sl].to(ct) * b[:, :, sl].to(ct)).sum(dim=-1)
    return out


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, *,
                      dropout: float = 0.0, seed: int | None = None,
                      return_weights: bool = False, block_q: int | None = None,
                      block_k: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Differentiable chunked attention in the input dtype (what the backend runs).

    Shapes as in :func:`chunked_forward`; returns ``out (B, Hq, Lq, Dv)``, or ``(out,
    weights (B, Hq, Lq, Lk))``. Gradients flow to q, k, v, the additive mask
    (``mask.bias``) and the returned weights. The same ``seed`` gives the same dropout
    mask in every call and in the backward.
    """
    return _ChunkedAttention.apply(q, k, v, mask.bias, mask, float(scale), float(dropout),
                                   seed, bool(return_weights), (block_q, block_k))


class ChunkedBackend(Backend):
    """``backend="chunked"``: every option of the reference in O(Lq + Lk) memory."""

    name = "chunked"

    def run(self, call: Call) -> tuple[Tensor, Tensor | None]:
        seed = draw_seed(call.generator, call.q.device) if call.dropout > 0 else None
        res = chunked_attention(call.q, call.k, call.v, call.mask, call.scale,
                                dropout=call.dropout, seed=seed,
                                return_weights=call.return_weights)
        return res if call.return_weights else (res, None)
