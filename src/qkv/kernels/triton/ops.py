"""The kernels as PyTorch operators: custom ops for ``torch.compile``, an autograd Function.

``torch.library.custom_op`` makes each launcher an opaque operator with a fake (shape-only)
implementation, so ``torch.compile`` puts it in its graph without tracing into Triton's
launch code and without a graph break. :class:`_TritonAttention` ties the forward and
backward operators together for autograd, and :func:`triton_attention` is the plain function
to call.

Outside a compiled graph the launchers are called directly: a custom operator's dispatch
costs host time on every call (its schema and aliasing checks), which a small call, whose
kernels take microseconds, pays many times over.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bwd import backward
from .fwd import forward
from .weights import attention_weights

__all__ = ["triton_attention", "triton_attention_weights"]

_BAND = "float scale, int? left, int? right"


@torch.library.custom_op(
    "qkv::triton_attention_fwd", mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, Tensor? lengths, {_BAND}) -> (Tensor, Tensor)",
)
def _fwd_op(q, k, v, lengths, scale, left, right):
    return forward(q, k, v, lengths, scale, left, right)


@_fwd_op.register_fake
def _(q, k, v, lengths, scale, left, right):
    b, hq, lq, _ = q.shape
    out = q.new_empty(b, hq, lq, v.shape[-1])  # (B, Hq, Lq, Dv)
    return out, q.new_empty(b, hq, lq, dtype=torch.float32)  # lse (B, Hq, Lq)


@torch.library.custom_op(
    "qkv::triton_attention_bwd", mutates_args=(),
    schema=("(Tensor do, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? lengths, "
            f"{_BAND}, bool deterministic) -> (Tensor, Tensor, Tensor)"),
)
def _bwd_op(do, q, k, v, out, lse, lengths, scale, left, right, deterministic):
    return backward(do, q, k, v, out, lse, lengths, scale, left, right, deterministic)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, lengths, scale, left, right, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op(
    "qkv::triton_attention_weights", mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor lse, Tensor? lengths, {_BAND}) -> Tensor",
)
def _weights_op(q, k, lse, lengths, scale, left, right):
    return attention_weights(q, k, lse, lengths, scale, left, right)


@_weights_op.register_fake
def _(q, k, lse, lengths, scale, left, right):
    return q.new_empty(*q.shape[:3], k.shape[2])  # (B, Hq, Lq, Lk)


def _eager(t: Tensor) -> bool:
    """True outside ``torch.compile``'s tracing (Dynamo, or AOTAutograd's fake and functional
    tensors), where the launchers can be called without their operator."""
    return type(t) is Tensor and not torch.compiler.is_compiling()


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lengths, scale, left, right, deterministic):
        run = forward if _eager(q) else _fwd_op
        out, lse = run(q, k, v, lengths, scale, left, right)
        ctx.save_for_backward(q, k, v, out, lse, lengths)
        ctx.band = (scale, left, right)
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, lengths = ctx.saved_tensors
        deterministic = ctx.deterministic or torch.are_deterministic_algorithms_enabled()
        run = backward if _eager(dout) else _bwd_op
        dq, dk, dv = run(dout, q, k, v, out, lse, lengths, *ctx.band, deterministic)
        return dq, dk, dv, None, None, None, None, None


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    left: int | None = None,
    right: int | None = None,
    lengths: Tensor | None = None,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fused attention in canonical form, differentiable in q, k and v.

    Args:
        q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); fp16, bf16 or fp32 (fp32
            runs its matmuls in TF32 on the GPU); ``Hq % Hkv == 0``; D, Dv <= 256.
        scale: > 0, multiplies ``q @ k^T``.
        left, right: the band, bottom-right aligned: query ``i`` sees key ``j`` iff
            ``-left <= j - (i + Lk - Lq) <= right``; None = unbounded; causal is ``right=0``.
        lengths: int32 (B,): key ``j`` of batch row ``b`` is hidden iff ``j >= lengths[b]``.
        deterministic: a bitwise reproducible backward (dQ in its own pass instead of float32
            atomics); also on whenever ``torch.use_deterministic_algorithms(True)`` is.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in q's dtype (0 for a query that sees no key) and the
        log-sum-exp ``lse (B, Hq, Lq)`` float32 in log2 units (``-inf`` for such a query),
        which carries no gradient.
    """
    if _eager(q) and not (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad)):
        return forward(q, k, v, lengths, scale, left, right)  # no graph to record
    return _TritonAttention.apply(q, k, v, lengths, scale, left, right, deterministic)


def triton_attention_weights(q, k, lse, *, scale, left=None, right=None, lengths=None):
    """The weights (B, Hq, Lq, Lk) of the call that returned ``lse`` (no gradient)."""
    run = attention_weights if _eager(q) else _weights_op
    return run(q, k, lse, lengths, scale, left, right)
