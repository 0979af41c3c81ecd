"""Queries, keys and mask of a ``torch.nn.MultiheadAttention`` call, as its math uses them.

:func:`mha_inputs` redoes the input projections of the module (``in_proj_weight`` or the
separate ``q_proj_weight``/``k_proj_weight``, ``bias_k``, ``add_zero_attn``) and folds
``attn_mask`` and ``key_padding_mask`` (bool: True = *hidden*, PyTorch's convention for this
module; or float, added) into one additive mask, so that qkv can compute the weights the
module's softmax produced.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mha_inputs"]


def mha_inputs(mod: nn.MultiheadAttention, query: Tensor, key: Tensor,
               key_padding_mask: Tensor | None, attn_mask: Tensor | None):
    """``(q (B, H, Lq, hd), k (B, H, Lk, hd), mask (B|1, H|1, Lq|1, Lk) float or None)``,
    or None (with a warning) for inputs this cannot read (nested tensors)."""
    if query.is_nested or key.is_nested:
        warnings.warn("qkv.capture: nn.MultiheadAttention ran on nested tensors; its "
                      "attention is not recorded", stacklevel=4)
        return None
    with torch.no_grad(), torch._C.DisableTorchFunction():
        return _mha_inputs(mod, query, key, key_padding_mask, attn_mask)


def _mha_inputs(mod, query, key, key_padding_mask, attn_mask):
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not mod.batch_first:  # (L, B, E) -> (B, L, E)
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    b, lq, e = query.shape
    h = mod.num_heads
    hd = e // h
    if mod._qkv_same_embed_dim:
        wq, wk = mod.in_proj_weight[:e], mod.in_proj_weight[e:2 * e]
    else:
        wq, wk = mod.q_proj_weight, mod.k_proj_weight
    bq = bk = None
    if mod.in_proj_bias is not None:
        bq, bk = mod.in_proj_bias[:e], mod.in_proj_bias[e:2 * e]
    qp = F.linear(query, wq, bq)  # (B, Lq, E)
    kp = F.linear(key, wk, bk)  # (B, Lk, E)
    extra = 0
    if mod.bias_k is not None:
        kp = torch.cat([kp, mod.bias_k.reshape(1, 1, e).expand(b, 1, e)], dim=1)  # (B, Lk+1, E)
        extra += 1
    q = qp.view(b, lq, h, hd).transpose(1, 2)  # (B, H, Lq, hd)
    k = kp.view(b, kp.shape[1], h, hd).transpose(1, 2)  # (B, H, Lk, hd)
    if mod.add_zero_attn:
        k = torch.cat([k, k.new_zeros(b, h, 1, hd)], dim=2)  # (B, H, Lk+1, hd)
        extra += 1
    ct = torch.promote_types(q.dtype, torch.float32)
    mask = None
    if attn_mask is not None:
        am = _additive(attn_mask, ct)
        am = am.view(1, 1, *am.shape) if am.dim() == 2 else am.view(b, h, *am.shape[-2:])
        mask = F.pad(am, (0, extra))  # (1|B, 1|H, Lq, Lk)
    if key_padding_mask is not None:
        kpm = _additive(key_padding_mask, ct).view(b, 1, 1, -1)
        kpm = F.pad(kpm, (0, extra))  # (B, 1, 1, Lk)
        mask = kpm if mask is None else mask + kpm
    return q, k, mask


def _additive(m: Tensor, ct: torch.dtype) -> Tensor:
    """MultiheadAttention masks as additive floats: bool True (= hidden) -> -inf."""
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=ct, device=m.device).masked_fill_(m, -math.inf)
    return m.to(ct)
