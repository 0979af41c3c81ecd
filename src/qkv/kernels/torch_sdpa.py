"""PyTorch's own ``scaled_dot_product_attention``: the baseline qkv is measured against.

SDPA's ``is_causal`` is aligned top-left, so bottom-right causal with Lq != Lk, windows and
combined masks are passed as one dense bool mask. Rows with no visible key would give NaN
in some SDPA kernels; they are opened to every key for the call and their output is then
selected to 0, which also keeps their gradients at 0.

An additive mask keeps its values: on CPU it is passed in float32 (SDPA's CPU kernels add a
float32 mask to half-precision scores in float32), elsewhere in the input dtype, and a call
whose finite mask values would become infinite in float16/bfloat16 is refused, so ``auto``
falls back (only ``-inf`` hides a key). SDPA's CPU kernel returns 0 for a query holding
NaN; such rows are set to NaN, as every other backend gives.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Backend, Call

# enable_gqa arrived in torch 2.5; the builtin has no inspectable signature, so read the doc.
_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class TorchSDPABackend(Backend):
    name = "torch"

    def unsupported(self, call: Call) -> str | None:
        if call.return_weights:
            return "return_weights=True (SDPA does not return the attention weights)"
        if call.generator is not None:
            return "a dropout generator (SDPA draws dropout from the global RNG)"
        bias = call.mask.bias
        if bias is not None and call.needs_grad and bias.numel():
            # SDPA's backward recomputes the weights as exp(score - lse) from one float lse,
            # which rounds at the row's magnitude: on a row whose largest bias is 256 or
            # more away from 0 (2**37 in float64) that error exceeds the scores' own
            # rounding (at -1e9, log(sum) vanishes). Typically a row "masked" with a finite
            # value: leave it to chunked, which keeps the row's max and sum apart.
            limit = 2.0**37 if call.compute_dtype == torch.float64 else 2.0**8
            top = bias.amax(dim=-1)  # (B|1, Hq|1, Lq|1); -inf: a hidden row, fine
            if bool((torch.isfinite(top) & (top.abs() >= limit)).any()):
                return (f"gradients through an additive mask with a row whose largest value "
                        f"is {limit:g} or more away from 0 (SDPA's backward loses precision "
                        "there)")
        if bias is not None and not call.q.is_cpu and bias.dtype != call.q.dtype:
            # SDPA adds the mask in the input dtype: a finite value must stay finite there.
            cast = bias.to(call.q.dtype)
            if bool((torch.isinf(cast) & torch.isfinite(bias)).any()):
                return (f"an additive mask with finite values beyond {call.q.dtype}'s range "
                        "(they would become -inf and hide their keys)")
        return None

    def run(self, call: Call) -> tuple[Tensor, Tensor | None]:
        q, k, v, m = call.q, call.k, call.v, call.mask
        kwargs = {}
        if call.groups > 1:
            if _HAS_GQA:
                kwargs["enable_gqa"] = True
            else:  # torch < 2.5: no native GQA, repeat the kv heads
                k = k.repeat_interleave(call.groups, dim=1)
                v = v.repeat_interleave(call.groups, dim=1)
        is_causal = m.causal and m.lq == m.lk and m.left is None and m.right == 0
        attn_mask, row_visible = None, None
        if not m.is_empty and not (is_causal and not m.has_tensor):
            is_causal = False
            allowed, bias = m.dense(q.device)
            if allowed is not None:
                row_visible = allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, Lq, 1)
                allowed = allowed | ~row_visible  # open hidden rows; their output is zeroed
            if bias is not None:
                bias = bias.to(call.compute_dtype if q.is_cpu else q.dtype)
                if allowed is not None:
                    attn_mask = torch.where(allowed, bias, float("-inf"))
                else:
                    attn_mask = bias
            else:
                attn_mask = allowed
        if call.lk == 0:  # SDPA rejects empty keys: every row is hidden, output 0
            k0 = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, 0, D)
            v0 = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (B, Hq, 0, Dv)
            return (q @ k0.transpose(-1, -2)) @ v0, None  # sums over no key: 0, in the graph
        out = _sdpa(q, k, v, attn_mask=attn_mask, dropout_p=call.dropout,
                    is_causal=is_causal, scale=call.scale, **kwargs)  # (B, Hq, Lq, Dv)
        if row_visible is not None and not bool(row_visible.all()):
            out = torch.where(row_visible, out, torch.zeros_like(out))
        return out, None

    def plain_runner(self, call: Call):
        """A function ``f(q, k, v) -> out (B, Hq, Lq, Dv)`` that computes every call with ``call``'s
        signature (shapes, dtypes, mask, scale) exactly as :meth:`run` would, decided once:
        or None when the call needs :meth:`run`'s general handling (a tensor mask, a band
        that hides keys from some query but is not square causal, dropout, no keys)."""
        m = call.mask
        if call.dropout != 0.0 or call.lq == 0 or call.lk == 0 or m.has_tensor:
            return None
        if m.is_empty or (m.causal and m.lq == 1 and m.left is None and m.right == 0):
            is_causal = False  # nothing hidden (one query sees every key bottom-right)
        elif m.causal and m.lq == m.lk and m.left is None and m.right == 0:
            is_causal = True
        else:
            return None
        if call.groups > 1 and not _HAS_GQA:
            return None
        # Only the options that differ from SDPA's defaults: each keyword costs parsing.
        # SDPA's default scale is 1 / sqrt(D) in double precision, the same number.
        kw = {"is_causal": True} if is_causal else {}
        if call.scale != 1.0 / math.sqrt(call.q.shape[-1]):
            kw["scale"] = call.scale
        if call.groups > 1:
            kw["enable_gqa"] = True
        return functools.partial(_sdpa, **kw)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
    """PyTorch's SDPA, with NaN in a query propagated to its output row as qkv promises
    (SDPA's CPU kernel gives 0 there). ``out (B, Hq, Lq, Dv)``."""
    out = F.scaled_dot_product_attention(q, k, v, **options)
    if q.numel() and math.isnan(q.detach().max()):  # max propagates NaN: one reduction
        out = torch.where(q.isnan().any(dim=-1, keepdim=True), float("nan"), out)
    return out
