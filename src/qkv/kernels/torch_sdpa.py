"""PyTorch's own ``scaled_dot_product_attention``: the baseline qkv is measured against.

SDPA's ``is_causal`` is aligned top-left, so bottom-right causal with Lq != Lk, windows and
combined masks are passed as one dense bool mask. Rows with no visible key would give NaN
in some SDPA kernels; they are opened to every key for the call and their output is then
selected to 0, which also keeps their gradients at 0.

An additive mask keeps its values: on CPU it is passed in float32 (SDPA's CPU kernels add a
float32 mask to half-precision scores in float32), elsewhere in the input dtype, and a call
whose finite mask values would become infinite in float16/bfloat16 is refused, so ``auto``
falls back (only ``-inf`` hides a key).

NaN and inf in a query or key: the SDPA kernels get them wrong in ways qkv's rules forbid.
The CPU flash kernel returns 0, not NaN, for a row whose visible scores are all NaN when
the row's key block is shorter than one SIMD vector (Lk < 16 float32 lanes with AVX-512, <
8 with AVX2): its scalar tail takes ``std::max``, which drops NaN, and a row whose maximum
stays ``-inf`` counts as fully masked. In float16/bfloat16 it returns 0 for rows with a
+inf score (so half-precision calls are always checked). With a mask tensor, a NaN or inf
key hidden from some queries leaks into their rows (the mask is added to the scores, and
-inf + NaN is NaN); the CPU math kernel does the same with ``is_causal``, and so did the
float32 CUDA kernels on an H200. Such calls are computed by the chunked backend
instead, which follows the rules (docs/semantics.md): a call with a mask checks q and k
with one reduction each; a plain call (no mask, or square causal) checks only where some
kernel SDPA may pick was seen to drop NaN or +inf, or to let a key causal hides through,
for its signature (:func:`_drops_nan` runs each kernel on such inputs once per signature).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Backend, Call

# enable_gqa arrived in torch 2.5; the builtin has no inspectable signature, so read the doc.
_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

try:  # torch >= 2.3: run SDPA with one chosen kernel (the NaN probe asks each CPU kernel)
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as _sdpa_kernel

    _CPU_KERNELS = (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    _CUDA_KERNELS = tuple(getattr(SDPBackend, name) for name in (
        "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
        if hasattr(SDPBackend, name))
except ImportError:  # no way to ask each kernel: every call keeps the NaN/inf check
    _sdpa_kernel, _CPU_KERNELS, _CUDA_KERNELS = None, (), ()


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
        if not _finite(call.q, call.k):
            return _chunked().run(call)  # NaN/inf in a query or key: see the module doc
        q, k, v, m = call.q, call.k, call.v, call.mask
        kwargs = {}
        if call.groups > 1:
            if _HAS_GQA:
                kwargs["enable_gqa"] = True
            else:  # torch < 2.5: no native GQA, repeat the kv heads
                k = k.repeat_interleave(call.groups, dim=1)
                v = v.repeat_interleave(call.groups, dim=1)
        kind = _plain_kind(m)  # None: SDPA needs a mask tensor
        is_causal, attn_mask, row_visible = bool(kind), None, None
        if kind is None:
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
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=call.dropout, is_causal=is_causal,
            scale=call.scale, **kwargs)  # (B, Hq, Lq, Dv)
        if row_visible is not None and not bool(row_visible.all()):
            out = torch.where(row_visible, out, torch.zeros_like(out))
        return out, None

    def plain_runner(self, call: Call, *, any_keys: bool = False,
                     fixed_keys: Tensor | None = None):
        """A function ``f(q, k, v) -> out (B, Hq, Lq, Dv)`` that computes every call with ``call``'s
        signature (shapes, dtypes, mask, scale) exactly as :meth:`run` would, decided once:
        or None when the call needs :meth:`run`'s general handling (a tensor mask, a band
        that hides keys from some query but is not square causal, dropout, no keys).

        ``any_keys=True``: ``f`` also serves calls that differ only in the number of keys
        (and of queries, for square causal), as a growing KV cache makes; it then decides
        the NaN/inf check once per key count. ``fixed_keys``: keys that every call will pass
        again unchanged (a decoder's cross-attention cache); they are checked for NaN/inf
        here, once, and a call that passes that very tensor checks only its queries."""
        m = call.mask
        if call.dropout != 0.0 or call.lq == 0 or call.lk == 0:
            return None
        kind = _plain_kind(m)
        if kind is None or (call.groups > 1 and not _HAS_GQA):
            return None
        # Only the options that differ from SDPA's defaults: each keyword costs parsing.
        # SDPA's default scale is 1 / sqrt(D) in double precision, the same number.
        kw = {"is_causal": True} if kind else {}
        if call.scale != 1.0 / math.sqrt(call.q.shape[-1]):
            kw["scale"] = call.scale
        if call.groups > 1:
            kw["enable_gqa"] = True
        sdpa = functools.partial(F.scaled_dot_product_attention, **kw) if kw else \
            F.scaled_dot_product_attention
        exact = functools.partial(_exact, mask=m, scale=call.scale)
        if any_keys:
            checked = fixed_keys if fixed_keys is not None and _finite(fixed_keys) else None
            return _runner_any_keys(sdpa, exact, kw, call, causal=bool(kind),
                                    finite_keys=checked)
        if not _drops_nan(kw, call, lq=call.lq, lk=call.lk):
            return sdpa  # SDPA itself: it propagates NaN and inf for this signature

        def checked(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if _finite(q, k):
                return sdpa(q, k, v)  # (B, Hq, Lq, Dv)
            return exact(q, k, v)
        return checked


def _plain_kind(m) -> bool | None:
    """How SDPA runs mask ``m`` without a mask tensor: False (no key hidden from any query:
    no mask, or causal with one query, which sees every key bottom-right), True (square
    causal: SDPA's ``is_causal``), None (it needs a mask tensor)."""
    if m.has_tensor:
        return None
    if m.is_empty or (m.causal and m.lq == 1 and m.left is None and m.right == 0):
        return False
    if m.causal and m.lq == m.lk and m.left is None and m.right == 0:
        return True
    return None


def _drops_nan(kw: dict, call: Call, *, lq: int, lk: int) -> bool:
    """Whether SDPA with options ``kw`` gives a non-NaN output row, for inputs of ``call``'s
    dtype, device, head dims and head groups with ``lq`` queries and ``lk`` keys, where a
    row's scores are all NaN or +inf (from the query, or from every key), or where one
    score is NaN or +inf among finite ones. Whether SDPA drops such a NaN depends on the
    kernel it picks, the key length, the dtype, the CPU's vector width and the PyTorch
    version, so it is asked, not assumed: once without and once with autograd (the kernels
    may differ). Only CPU and CUDA kernels are asked; other devices keep the check."""
    q = call.q
    if q.device.type not in ("cpu", "cuda") or (
            q.is_cpu and q.dtype in (torch.float16, torch.bfloat16)):
        # Keep the check. In half precision the CPU kernels give 0 for a row where one
        # +inf score stands among finite ones whatever the probe shows at its length.
        return True
    return _probe(tuple(sorted(kw.items())), q.dtype, q.device, call.groups, lq, lk,
                  q.shape[-1], call.v.shape[-1])


@functools.lru_cache(maxsize=4096)
def _probe(kw: tuple, dtype, device, groups: int, lq: int, lk: int, d: int, dv: int) -> bool:
    """:func:`_drops_nan`, remembered per question (a decoding loop asks each key count).
    Each kernel SDPA may pick on the device (CPU: flash, math; CUDA: flash, efficient,
    cuDNN, math) is asked on its own, with and without autograd, so the answer does not
    depend on which kernels the caller had enabled."""
    if _sdpa_kernel is None:
        return True
    kernels = _CPU_KERNELS if device.type == "cpu" else _CUDA_KERNELS
    try:
        with torch.inference_mode(False):
            for backend, grad in itertools.product(kernels, (False, True)):
                with torch.set_grad_enabled(grad):
                    opts = {"dtype": dtype, "device": device, "requires_grad": grad}
                    # Every score NaN (batch 0: NaN queries; 1: NaN keys) or +inf (2: +inf
                    # queries; 3: +inf keys); one score +inf (4) or NaN (5) among finite
                    # ones, on key 0, which every row sees (causal too): every row NaN.
                    # One score NaN (6) or +inf (7) on the last key, which causal hides
                    # from every row but the last: only the rows that see it are NaN (a
                    # kernel that adds the causal mask to the scores lets it through).
                    # One query head per kv head.
                    qp = torch.ones(8, groups, lq, d, **opts)
                    kp = torch.ones(8, 1, lk, d, **opts)
                    vp = torch.ones(8, 1, lk, dv, **opts)
                    with torch.no_grad():
                        qp[0] = kp[1] = kp[5, :, 0] = kp[6, :, -1] = float("nan")
                        qp[2] = kp[3] = kp[4, :, 0] = kp[7, :, -1] = float("inf")
                    want = torch.ones(8, 1, lq, 1, dtype=torch.bool, device=device)
                    if dict(kw).get("is_causal") and lq > 1:  # square: row i sees 0..i
                        want[6:, :, :-1] = False
                    try:  # a kernel that cannot take these inputs warns why, then raises
                        with _sdpa_kernel([backend]), warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            out = F.scaled_dot_product_attention(qp, kp, vp, **dict(kw))
                    except RuntimeError:  # so SDPA never picks it here: nothing to ask
                        continue
                    got = out.detach().isnan()  # (8, groups, lq, dv)
                    if not torch.equal(got, want.expand_as(got)):
                        return True
    except RuntimeError:  # keep the check when in doubt
        return True
    return False


def _finite(*ts: Tensor) -> bool:
    """Whether every tensor holds no NaN or inf, by one reduction each (a sum that
    overflows says no: that call only takes the exact path). On a GPU the sums are added
    on the device and read once: each read waits for the device."""
    ts = tuple(t.detach() if t.requires_grad else t for t in ts)  # detach: only if needed
    if ts[0].is_cuda:
        acc = torch.float32 if ts[0].dtype in (torch.float16, torch.bfloat16) else None
        return math.isfinite(sum(t.sum(dtype=acc) for t in ts))  # empty sums are 0
    return all(t.numel() == 0 or math.isfinite(t.sum()) for t in ts)


@functools.cache
def _chunked():
    from .chunked.backend import ChunkedBackend

    return ChunkedBackend()


def _exact(q: Tensor, k: Tensor, v: Tensor, *, mask, scale: float) -> Tensor:
    """The chunked backend's ``out (B, Hq, Lq, Dv)`` for a plain call (no mask, or causal as
    ``mask``: square or one query) of these lengths: what every backend gives for NaN/inf."""
    m = dataclasses.replace(mask, lq=q.shape[-2], lk=k.shape[-2])
    return _chunked().run(Call(q, k, v, m, scale))[0]


#: (SDPA options, dtype, device, head groups, D, Dv, Lq unless causal) -> {key count: whether
#: SDPA drops NaN there}
_DROPS: dict[tuple, dict[int, bool]] = {}


def _runner_any_keys(sdpa, exact, kw: dict, call: Call, *, causal: bool,
                     finite_keys: Tensor | None = None):
    """``sdpa``, or ``exact`` for a query or key holding NaN/inf where :func:`_drops_nan`
    finds SDPA wrong, decided once per key count (the other dims, dtype and device stay
    those of ``call``). ``finite_keys``: a key tensor already found finite; a call passing
    that very tensor checks its queries alone."""
    q0 = call.q
    if len(_DROPS) >= 256:
        _DROPS.clear()
    drops = _DROPS.setdefault(  # shared by every runner of this kind (each decode has one)
        (tuple(sorted(kw.items())), q0.dtype, q0.device, call.groups, q0.shape[-1],
         call.v.shape[-1], None if causal else call.lq), {})

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        lk = k.shape[-2]
        needed = drops.get(lk)
        if needed is None:
            if len(drops) >= 4096:
                drops.clear()
            needed = drops[lk] = _drops_nan(kw, call, lq=q.shape[-2], lk=lk)
        if needed and not (_finite(q) if k is finite_keys else _finite(q, k)):
            return exact(q, k, v)
        return sdpa(q, k, v)  # (B, Hq, Lq, Dv)
    return run
