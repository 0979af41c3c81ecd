"""qkv: the self-attention mechanism of the Transformer, exact, fast, trainable and visible."""

from __future__ import annotations

from . import reference_numpy
from .attention_capture import capture
from .functional import AttentionSteps, attention, explain
from .kernels import names as _backend_names
from .layers import KVCache, MultiHeadAttention
from .masks import causal_mask, padding_mask, window_mask

__version__ = "0.1.0"

__all__ = [
    "AttentionSteps",
    "KVCache",
    "MultiHeadAttention",
    "attention",
    "backends",
    "capture",
    "causal_mask",
    "explain",
    "load_pretrained",
    "padding_mask",
    "reference_numpy",
    "window_mask",
]


def load_pretrained(name_or_path="all-MiniLM-L6-v2", *, device=None):
    """A pretrained BERT encoder built from qkv's layers (see :mod:`qkv.models.loading`);
    imported on first use so ``import qkv`` stays light."""
    from .models.loading import load_pretrained as load

    return load(name_or_path, device=device)


def backends() -> list[str]:
    """Names accepted by ``qkv.attention(..., backend=name)``, besides ``"auto"``."""
    return _backend_names()
