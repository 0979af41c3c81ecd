"""``backend="triton"``: qkv's fused FlashAttention-2 style kernels, forward and backward.

What it does: float16 and bfloat16 (float32 too, with TF32 matmuls on the GPU); head dims up
to 256, any (not only powers of two: padded inside the kernel); any Lq and Lk, Lq != Lk with
bottom-right causal; windows; GQA/MQA (the kv head is indexed, never repeated); key padding,
given as the bool mask ``qkv.padding_mask`` builds (B, 1, 1, Lk), prefix rows of True, which
the kernels read as per-batch key lengths; ``return_weights`` from a second kernel.

What it does not do (``unsupported`` names it, ``auto`` falls back, ``backend="triton"``
raises): any other bool mask, additive float masks, dropout, float64, head dims over 256,
``scale <= 0``, weights that need a gradient, and CPU tensors unless ``TRITON_INTERPRET=1``
was set before the process imported qkv (the interpreter: slow, for tests).

The kernel modules are imported on first use, not with qkv, so the interpreter setting is
read when the kernels are defined; :func:`interpreting` says which mode they are in.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

from ..base import Backend, Call

__all__ = ["TritonBackend", "interpreting"]

_KERNELS = __name__ + ".fwd"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when the kernels run (or, once imported, will run) in Triton's CPU interpreter.

    Triton decides at definition time, for its own library functions (when ``triton`` is
    imported) as for qkv's kernels (on their first use): both must have seen
    ``TRITON_INTERPRET=1``, so the variable has to be set before the process imports qkv.
    """
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    fwd = sys.modules.get(_KERNELS)
    if fwd is not None:
        return isinstance(fwd._fwd_kernel, InterpretedFunction)
    triton_interprets = isinstance(getattr(standard, "zeros", None), InterpretedFunction)
    return triton_interprets and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def key_lengths(call: Call) -> Tensor | None:
    """int32 (B,) key lengths from the call's key-padding mask; None when it has no mask."""
    if call.mask.allowed is None:
        return None
    lengths = call.mask.key_lengths()
    if lengths is None:
        return None
    return lengths.to(torch.int32).expand(call.batch).contiguous()  # (B,)


class TritonBackend(Backend):
    name = "triton"
    # Padded keys are never loaded (masked loads read 0) and blocks the band hides are never
    # visited, so qkv.attention need not zero hidden keys first.
    handles_hidden_keys = True

    def unsupported(self, call: Call) -> str | None:
        q = call.q
        if not q.is_cuda and not interpreting():
            return (f"{q.device.type} tensors (the Triton kernels run on CUDA; "
                    "TRITON_INTERPRET=1 set before importing qkv runs them on CPU, slowly)")
        if q.dtype not in _DTYPES:
            return f"{q.dtype} inputs (only float16, bfloat16 and float32)"
        if max(q.shape[-1], call.v.shape[-1]) > 256:
            return f"head dims over 256 (got D={q.shape[-1]}, Dv={call.v.shape[-1]})"
        if call.dropout > 0:
            return "dropout > 0"
        if call.scale <= 0:
            return f"scale <= 0 (got {call.scale}; the kernel folds a positive scale into exp2)"
        if call.mask.bias is not None:
            return "an additive float mask"
        if call.mask.allowed is not None and call.mask.key_lengths() is None:
            return ("a bool mask other than key padding (only (B, 1, 1, Lk) masks whose rows "
                    "are True then False, as qkv.padding_mask builds)")
        if call.return_weights and call.needs_grad:
            return "return_weights=True with gradients (the weights kernel has no backward)"
        return None

    def run(self, call: Call) -> tuple[Tensor, Tensor | None]:
        from .ops import triton_attention, triton_attention_weights

        lengths = key_lengths(call)
        band = dict(scale=call.scale, left=call.mask.left, right=call.mask.right,
                    lengths=lengths)
        out, lse = triton_attention(call.q, call.k, call.v, **band)  # (B, Hq, Lq, Dv)
        weights = None
        if call.return_weights:
            weights = triton_attention_weights(call.q, call.k, lse, **band)  # (B, Hq, Lq, Lk)
        return out, weights
