"""The registry of attention backends and the rule ``backend="auto"`` follows.

Every backend computes the same function (see :mod:`qkv.backends.base`); they differ in
how. Backends whose dependencies are optional (Triton) register only when importable.
"""

from __future__ import annotations

import importlib.util

from .base import Backend, Call
from .chunked import ChunkedBackend, memory_reason, sdpa_needs_dense_mask
from .reference import ReferenceBackend
from .torch_sdpa import TorchSDPABackend

__all__ = ["Backend", "Call", "auto_order", "get", "names", "register"]

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add a backend under ``backend.name`` (replacing one of the same name)."""
    _REGISTRY[backend.name] = backend


def names() -> list[str]:
    """The names ``qkv.attention(..., backend=name)`` accepts (besides ``"auto"``)."""
    return list(_REGISTRY)


def get(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string; got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; expected 'auto' or one of {names()}"
        ) from None


def auto_order(call: Call) -> list[tuple[str, str]]:
    """Backends in the order ``auto`` tries them for ``call``, each with the reason."""
    order = []
    if call.q.is_cuda:
        order.append(("triton", "fused kernel on a CUDA device"))
    big = memory_reason(call)  # why the reference is too big for this call, or None
    dense = big is not None and sdpa_needs_dense_mask(call)
    if dense:
        order.append(("chunked", f"{big}; torch SDPA would need a dense (Lq x Lk) mask"))
    order.append(("torch", "PyTorch's fused SDPA kernels are the fastest general path"))
    if big is not None and not dense:
        order.append(("chunked", big))
    order.append(("reference", "the only backend left that does every option"))
    return [(n, why) for n, why in order if n in _REGISTRY]


register(ReferenceBackend())
register(TorchSDPABackend())
register(ChunkedBackend())

# The fused kernels need Triton (PyTorch's CUDA wheels bring it). Only look for it here:
# importing it costs a quarter of a second that CPU-only commands should not pay.
if importlib.util.find_spec("triton") is not None:
    from .triton import TritonBackend

    register(TritonBackend())
