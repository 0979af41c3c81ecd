"""qkv: the self-attention mechanism of the Transformer, exact, fast, trainable and visible.

The names below are imported on first use (PEP 562), so ``import qkv`` is quick and the
``qkv`` command can answer Ctrl-C cleanly while torch loads.
"""

from __future__ import annotations

import importlib

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

# Public name -> the module that defines it.
_LAZY = {
    "AttentionSteps": "functional",
    "capture": "attention_capture",
    "attention": "functional",
    "explain": "functional",
    "KVCache": "kv_cache",
    "MultiHeadAttention": "layers",
    "causal_mask": "masks",
    "padding_mask": "masks",
    "window_mask": "masks",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("__"):
        try:  # a submodule: qkv.functional, qkv.reference_numpy, ...
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_pretrained(name_or_path="all-MiniLM-L6-v2", *, device=None):
    """A pretrained BERT encoder built from qkv's layers (see :mod:`qkv.models.loading`);
    imported on first use so ``import qkv`` stays light."""
    from .models.loading import load_pretrained as load

    return load(name_or_path, device=device)


def backends() -> list[str]:
    """Names accepted by ``qkv.attention(..., backend=name)``, besides ``"auto"``."""
    from .kernels import names

    return names()
