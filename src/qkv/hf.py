"""qkv as a Hugging Face ``transformers`` attention implementation.

After :func:`register`, any model whose attention goes through ``transformers``' attention
interface (BERT, RoBERTa, GPT-2, Llama, Mistral, BART, ViT...) runs it through
:func:`qkv.attention` when loaded with ``attn_implementation="qkv"``::

    import qkv.hf
    qkv.hf.register()
    model = AutoModel.from_pretrained(path, attn_implementation="qkv")
    out = model(**inputs, output_attentions=True)   # weights from qkv, no eager fallback

Masks are built as for ``"sdpa"`` (4-D bool, True = may attend, or None with causal
attention), then passed to qkv unchanged; GQA, sliding windows (in the mask) and
additive position biases are supported. ``transformers`` is an optional dependency
(``pip install qkv[hf]``): it is imported by :func:`register`, never by ``import qkv``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import attention

__all__ = ["NAME", "attention_forward", "register"]

#: The name to pass as ``attn_implementation``.
NAME = "qkv"


def register(*, backend: str = "auto") -> str:
    """Register qkv with ``transformers.AttentionInterface`` (and its mask function) under
    the name ``"qkv"``; returns the name. ``backend`` is passed to :func:`qkv.attention`."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        raise ImportError("qkv.hf needs the transformers package; install it with "
                          "`pip install qkv[hf]`") from None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")

    def forward(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend,
                                 **kwargs)

    AttentionInterface.register(NAME, forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, *, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      position_bias: Tensor | None = None, backend: str = "auto",
                      **kwargs) -> tuple[Tensor, Tensor | None]:
    """The attention function ``transformers`` calls (same contract as its ``"sdpa"``).

    Args:
        query: ``(B, Hq, Lq, D)``; key, value: ``(B, Hkv, Lk, D)`` (GQA when Hkv < Hq).
        attention_mask: bool ``(B, 1, Lq, Lk)`` (True = may attend), additive float, or
            None.
        is_causal: PyTorch's top-left causal rule (default: ``module.is_causal``); used
            only when there is no mask, as the ``"sdpa"`` implementation does.

    Returns ``(out (B, Lq, Hq, Dv), weights (B, Hq, Lq, Lk) or None)``; the weights when
    ``output_attentions`` is asked for (in the call or the model's config).
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='qkv' does not support softcap; load the model "
                         "with attn_implementation='eager'")
    want = _wants_weights(module, kwargs)
    lq, lk = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(is_causal) and attention_mask is None and lq > 1
    full_lk = lk
    if causal and lk > lq:  # top-left causal hides keys after Lq (an empty static cache)
        key, value = key[:, :, :lq], value[:, :, :lq]
        lk = lq
        if position_bias is not None:
            position_bias = position_bias[..., :lq]
    mask = attention_mask
    if mask is not None and mask.shape[-1] > lk:
        mask = mask[..., :lk]
    if position_bias is not None:
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = position_bias.masked_fill(~mask, float("-inf"))
        else:
            mask = position_bias + mask
    window = None
    if causal and lk < lq:  # top-left: query i sees keys 0..i, i.e. (Lq - Lk) right of
        causal, window = False, (None, lq - lk)  # qkv's bottom-right diagonal
    res = attention(query, key, value, mask=mask, causal=causal, window=window, scale=scaling,
                    dropout=float(dropout), return_weights=bool(want), backend=backend)
    out, weights = res if want else (res, None)
    out = out.transpose(1, 2).contiguous()  # (B, Lq, Hq, Dv)
    if weights is not None and full_lk > lk:
        weights = torch.nn.functional.pad(weights, (0, full_lk - lk))  # (B, Hq, Lq, Lk)
    return out, weights


def _wants_weights(module, kwargs) -> bool:
    """Whether the caller asked for attention weights. Models pass ``output_attentions``
    down, or (transformers 5) collect the attention modules' outputs while a collector
    asking for ``*attentions`` is active; the model's config is the last resort."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector

        wanted = _active_collector.get()
    except (ImportError, AttributeError):
        wanted = None
    if wanted is not None:
        return any(key.endswith("attentions") for key in wanted)
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))
