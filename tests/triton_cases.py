"""The Triton kernels, run by Triton's CPU interpreter on small, odd shapes.

Every result is compared with the float64 oracle (``reference_numpy`` for outputs and
weights, the reference backend on float64 inputs for gradients) by the derived rule of
DESIGN.md: at most 2x (outputs, weights) or 3x (gradients) the error of the same
computation done plainly in the input dtype, + 1e-5. The interpreter cannot compute with
bfloat16 (Triton stores it as raw uint16 there and ``tl.dot`` multiplies the bit patterns),
so float16 and float32 are tested here and bfloat16 by ``benchmarks/gpu.py`` on a GPU.

On a CUDA machine the same cases run compiled, on CUDA tensors, with bfloat16 added::

    QKV_TRITON_DEVICE=cuda python -m pytest tests/triton_cases.py -o addopts= -n 8

There the kernels' float32 dots run in TF32, so the rule's baseline takes TF32 operands
too (:func:`tf32`).
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("QKV_TRITON_DEVICE") != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_triton.py in a process started with TRITON_INTERPRET=1",
                allow_module_level=True)

import qkv
from qkv.functional import prepare_call as _prepare
from qkv.kernels.base import Call
from qkv.kernels.triton import (
    TritonBackend,
    autotune,
    interpreting,
)
from qkv.kernels.triton.ops import triton_attention

from helpers import assert_grads_lowp_rule, assert_lowp_rule
from helpers import lowp_baseline as _lowp_baseline
from helpers import oracle as _oracle
from helpers import rand_qkv as _rand_qkv

CUDA = os.environ.get("QKV_TRITON_DEVICE") == "cuda"
if CUDA and not torch.cuda.is_available():
    pytest.fail("QKV_TRITON_DEVICE=cuda, but torch sees no CUDA device", pytrace=False)
DEVICE = "cuda" if CUDA else "cpu"

B, HQ, HKV, LQ, LK = 2, 4, 2, 37, 53
#: bfloat16 only where the kernels are compiled (see the module docstring)
LOW = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


def rand_qkv(*args, requires_grad=False, **kw):
    """helpers.rand_qkv on this run's device (the same numbers on CPU and CUDA)."""
    return tuple(t.to(DEVICE).requires_grad_(requires_grad)
                 for t in _rand_qkv(*args, **kw))


def tf32(t):
    """float32 ``t`` with its mantissa cut to TF32's 10 bits, toward zero (how Hopper's
    tensor cores read float32 operands; rounding to nearest would err half as much), the
    gradient passing straight through. Other dtypes, and the interpreter, unchanged."""
    if not CUDA or t.dtype != torch.float32:
        return t
    cut = (t.detach().view(torch.int32) & ~0x1FFF).view(torch.float32)
    return t + (cut - t).detach()


def lowp_baseline(*args, **kw):
    """The rule's baseline; on a GPU its float32 matmuls take TF32 operands, as the
    kernels' ``tl.dot`` does."""
    return _lowp_baseline(*args, operands=tf32, **kw)


def oracle(*args, **kw):
    """The float64 NumPy oracle's (out, weights), on this run's device."""
    return tuple(t.to(DEVICE) for t in _oracle(*args, **kw))


@pytest.mark.skipif(CUDA, reason="compiled for the GPU in this run")
def test_kernels_run_in_the_interpreter():
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    assert interpreting()
    assert isinstance(tl_standard.zeros, InterpretedFunction)  # triton itself, too


def check(q, k, v, *, grads=True, seed=11, **kw):
    """Run triton and compare output (and gradients) with the oracle by the derived rule."""
    out = qkv.attention(q, k, v, backend="triton", **kw)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:-1], v.shape[-1])
    want, _ = oracle(q, k, v, **kw)
    assert_lowp_rule(out, want, lowp_baseline(q, k, v, **kw))
    if not grads:
        return out
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(q)
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert_grads_lowp_rule(got, q, k, v, dout, baseline=lowp_baseline, **kw)
    return out


def lengths_mask(lengths, lk=LK):
    return qkv.padding_mask(torch.tensor(lengths, device=DEVICE), lk)  # (B, 1, 1, Lk)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("d,dv", [(16, 16), (40, 24), (24, 40), (64, 64)])
def test_forward_backward_head_dims(d, dv, dtype):
    check(*rand_qkv(B, HQ, HKV, LQ, LK, d, dv, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("lq,lk", [(37, 53), (53, 37)])
def test_causal_bottom_right(lq, lk):
    """Lq > Lk leaves the first Lq - Lk queries with no key: output 0, gradients 0."""
    q, k, v = rand_qkv(B, HQ, HKV, lq, lk, 40, dtype=torch.float16, requires_grad=True)
    out = check(q, k, v, causal=True)
    if lq > lk:
        assert (out[:, :, : lq - lk] == 0).all()


@pytest.mark.parametrize("kw", [
    {"window": (5, 3)},
    {"window": (7, None)},
    {"causal": True, "window": 9},
])
def test_windows(kw):
    check(*rand_qkv(B, HQ, HKV, LQ, LK, 40, dtype=torch.float16, requires_grad=True), **kw)


@pytest.mark.parametrize("hkv", [1, 4])
def test_mqa_and_plain_multi_head(hkv):
    check(*rand_qkv(B, HQ, hkv, LQ, LK, 40, dtype=torch.float16, requires_grad=True),
          causal=True)


@pytest.mark.parametrize("lengths,causal", [([0, 20], False), ([50, 7], True)])
def test_key_lengths(lengths, causal):
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, 40, dtype=torch.float16, requires_grad=True)
    out = check(q, k, v, mask=lengths_mask(lengths), causal=causal)
    if 0 in lengths:
        assert (out[lengths.index(0)] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN arithmetic in the interpreter
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_in_queries_and_keys_follow_the_oracle(value):
    """Before: a row with a NaN or +inf score had output 0 (its sum counted as "no key
    seen"). Now its output and its visible weights are NaN; a -inf score hides its key."""
    for dtype, kw in [(torch.float16, {"causal": True}), (torch.float32, {"window": (3, 1)})]:
        q, k, v = rand_qkv(1, 2, 1, 9, 13, 16, dtype=dtype, seed=4)
        k[0, 0, 5, 2] = value  # keys of kv head 0: seen by some rows of both query heads
        q[0, 1, 6, 3] = value
        out, w = qkv.attention(q, k, v, backend="triton", return_weights=True, **kw)
        want, want_w = oracle(q, k, v, **kw)
        assert want.isnan().any() or value == float("-inf")
        assert torch.equal(out.isnan(), want.isnan()), kw
        assert torch.equal(w.isnan(), want_w.isnan()), kw
        ok = ~want.isnan()
        assert_lowp_rule(out[ok], want[ok], lowp_baseline(q, k, v, **kw)[ok])

def test_padded_keys_are_never_read():
    """The backend claims handles_hidden_keys: NaN stored in padding must not leak."""
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, 16, dtype=torch.float16)
    k[1, :, 20:], v[1, :, 20:] = float("nan"), float("nan")
    k[0], v[0] = float("nan"), float("nan")
    for t in (q, k, v):
        t.requires_grad_(True)
    mask = lengths_mask([0, 20])
    out = qkv.attention(q, k, v, mask=mask, backend="triton")
    assert (out[0] == 0).all() and torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[1, :, 20:] == 0).all()
    clean = [t.detach().nan_to_num(0.0) for t in (q, k, v)]
    assert_lowp_rule(out, oracle(*clean, mask=mask)[0], lowp_baseline(*clean, mask=mask))


def test_hidden_blocks_are_skipped():
    """Key blocks no query of a tile can see are never loaded: NaN values there stay out.

    Causal, Lq = Lk = 64, 32 x 32 tiles: the first query tile needs keys 0..31 only. (Within
    a visited block a hidden NaN value would reach the output through 0 * NaN, as in the
    reference backend; skipping is what keeps it out here.)
    """
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, dtype=torch.float16)
    v[:, :, 40] = float("nan")
    with autotune.override(autotune.Config(32, 32, 1, 1)):
        out = qkv.attention(q, k, v, causal=True, backend="triton")
    assert torch.isfinite(out[:, :, :32]).all()
    assert torch.isnan(out[:, :, 40:]).all()  # they see key 40


def test_keys_the_band_hides_from_every_query_are_not_read():
    """Causal window (2, 0) over 40 keys, 2 queries: keys 0..35 are hidden from both. The
    tile of keys 32..39 is visited, so its hidden NaN keys must be zeroed before the call."""
    q, k, v = rand_qkv(1, 2, 2, 2, 40, 16, dtype=torch.float16)
    clean = qkv.attention(q, k, v, causal=True, window=(2, 0), backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :36], v2[:, :, :36] = float("nan"), float("nan")
    with autotune.override(autotune.Config(16, 32, 1, 1)):
        out = qkv.attention(q, k2, v2, causal=True, window=(2, 0), backend="triton")
    assert torch.isfinite(out).all() and torch.equal(out, clean)


@pytest.mark.parametrize("config", [autotune.Config(16, 32, 1, 1), autotune.Config(32, 16, 1, 1)])
def test_unequal_tiles(config):
    """Query and key tiles of different sizes, neither dividing the lengths."""
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, 40, 24, dtype=torch.float16, requires_grad=True)
    with autotune.override(config):
        check(q, k, v, causal=True, window=(20, None))


def test_float32_inputs():
    """float32 (TF32 matmuls on a GPU; exact float32 in the interpreter)."""
    check(*rand_qkv(B, HQ, HKV, LQ, LK, 40, dtype=torch.float32, requires_grad=True),
          causal=True)


def test_strided_inputs_and_gradient():
    """(B, L, H, D) tensors viewed as (B, H, L, D), and a non-contiguous output gradient
    (flash-attention #355)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, n, h, 40, generator=g).to(DEVICE, torch.float16)
               .transpose(1, 2).requires_grad_() for n, h in ((LQ, HQ), (LK, HKV), (LK, HKV)))
    out = qkv.attention(q, k, v, causal=True, backend="triton")
    dout = torch.randn(B, LQ, HQ, 40, generator=g).to(q).transpose(1, 2)  # non-contiguous
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(
        qkv.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                      backend="triton"), (q, k, v), dout.contiguous())
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [
    {"causal": True},
    {"window": (6, 2), "mask": lengths_mask([0, 30])},
])
def test_return_weights(kw):
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, 40, dtype=torch.float16)
    out, w = qkv.attention(q, k, v, return_weights=True, backend="triton", **kw)
    want_out, want_w = oracle(q, k, v, **kw)
    assert w.dtype == q.dtype and w.shape == (B, HQ, LQ, LK)
    assert_lowp_rule(out, want_out, lowp_baseline(q, k, v, **kw))
    # The weights' baseline: the exact weights rounded to the input dtype (a stricter bound
    # than the plain low-precision path, whose scores also carry float16 rounding).
    assert_lowp_rule(w, want_w, want_w.to(q.dtype), what="weights")
    assert (w[want_w == 0] == 0).all()  # hidden pairs are exactly 0
    # Rows sum to 1 (0 for a query that sees no key) up to rounding each weight to float16,
    # a relative 2**-11 each, so 2**-11 in total.
    sums = w.double().sum(-1)  # (B, Hq, Lq)
    assert torch.allclose(sums, want_w.sum(-1), rtol=0, atol=2.0**-11 + 1e-5)


def test_empty_keys_and_single_query():
    q, k, v = rand_qkv(B, HQ, HKV, LQ, 0, 16, dtype=torch.float16, requires_grad=True)
    out = qkv.attention(q, k, v, backend="triton")
    assert out.shape == (B, HQ, LQ, 16) and (out == 0).all()
    dq, = torch.autograd.grad(out, (q,), torch.ones_like(out))
    assert (dq == 0).all()
    # One new query against a cache of keys (decoding), with per-batch lengths.
    check(*rand_qkv(B, HQ, HKV, 1, LK, 16, dtype=torch.float16, requires_grad=True),
          causal=True, mask=lengths_mask([LK, 9]))


def test_torch_compile_has_no_graph_break():
    q, k, v = rand_qkv(1, 2, 1, 20, 30, 16, dtype=torch.float16, requires_grad=True)

    def loss(q, k, v):
        return qkv.attention(q, k, v, causal=True, backend="triton").float().square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_plain_function_returns_the_log_sum_exp():
    # float16 on a GPU, whose float32 dots are TF32: the products are then exact there too
    q, k, v = rand_qkv(1, 2, 2, 5, 7, 16, dtype=torch.float16 if CUDA else torch.float32)
    _out, lse = triton_attention(q, k, v, scale=0.25, right=0, lengths=torch.tensor([4],
                                dtype=torch.int32, device=DEVICE))
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25  # (1, 2, 5, 7)
    hidden = ~qkv.causal_mask(5, 7, device=DEVICE) | (torch.arange(7, device=DEVICE) >= 4)
    want = torch.logsumexp(s.masked_fill(hidden, float("-inf")), -1) / torch.log(
        torch.tensor(2.0, dtype=torch.float64))  # log2 units
    assert torch.allclose(lse.double(), want, atol=1e-5)


@pytest.mark.parametrize("kw,why", [
    ({"mask": torch.ones(LQ, LK, dtype=torch.bool, device=DEVICE)},
     "bool mask other than key padding"),
    ({"mask": lengths_mask([3, 5]).logical_not()}, "bool mask other than key padding"),
    ({"mask": torch.zeros(LQ, LK, device=DEVICE)}, "additive float mask"),
    ({"dropout": 0.1}, "dropout"),
    ({"scale": -1.0}, "scale <= 0"),
])
def test_unsupported_options_raise(kw, why):
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"backend 'triton' cannot do this call.*{why}"):
        qkv.attention(q, k, v, backend="triton", **kw)


def test_unsupported_dtype_device_and_weight_gradients():
    be = TritonBackend()
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 16, dtype=torch.float64)
    call, _ = _prepare(q, k, v, mask=None, causal=False, window=None, scale=None, dropout=0.0,
                       return_weights=False, generator=None)
    assert "torch.float64" in be.unsupported(call)
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    call = Call(q, k, v, call.mask, call.scale, return_weights=True)
    assert "return_weights=True with gradients" in be.unsupported(call)
    with torch.no_grad():
        assert be.unsupported(call) is None


# ---- the backward's variants: fused dQ (atomics) or deterministic, GQA splits, split_d ----
def grads(q, k, v, dout, **kw):
    out = qkv.attention(q, k, v, backend="triton", **kw)
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("hq,hkv", [(6, 2), (5, 1)])
def test_gqa_heads_split_unevenly_over_programs(hq, hkv):
    """Groups of 3 and 5 query heads split in two programs each (1+2, 2+3 heads), partial
    dK/dV summed in float32; and the same with one program per group (no split)."""
    from qkv.kernels.triton import bwd

    q, k, v = rand_qkv(1, hq, hkv, 29, 41, 24, dtype=torch.float16, requires_grad=True)
    assert bwd.split_heads(hq // hkv, 4, None) == 2
    split = check(q, k, v, causal=True)
    dout = torch.randn(split.shape, generator=torch.Generator().manual_seed(3)).to(q)
    got = grads(q, k, v, dout, causal=True)
    original = bwd.split_heads
    bwd.split_heads = lambda groups, tiles, arch: 1
    try:
        serial = grads(q, k, v, dout, causal=True)
    finally:
        bwd.split_heads = original
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(qkv.attention(q64, k64, v64, causal=True, backend="reference"),
                               (q64, k64, v64), dout.double())
    for a, b, w in zip(got, serial, want, strict=True):
        # Same sums in another order: both within float16 rounding of the exact gradient.
        assert_lowp_rule(a, w, b)


def test_deterministic_backward_is_reproducible_and_agrees():
    """deterministic=True (dQ in its own pass) and torch.use_deterministic_algorithms both
    give bitwise equal gradients run to run, within the rule of the oracle, and close to
    the fused (atomic) backward's."""
    q, k, v = rand_qkv(1, 2, 1, 29, 41, 24, dtype=torch.float16, requires_grad=True)
    dout = torch.randn(1, 2, 29, 24, generator=torch.Generator().manual_seed(2)).to(q)
    kw = dict(causal=True, window=(9, None))
    fused = grads(q, k, v, dout, **kw)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = grads(q, k, v, dout, **kw)
    finally:
        torch.use_deterministic_algorithms(before)
    out, _ = triton_attention(q, k, v, scale=24 ** -0.5, left=9, right=0, deterministic=True)
    direct = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(qkv.attention(q64, k64, v64, backend="reference", **kw),
                               (q64, k64, v64), dout.double())
    base = torch.autograd.grad(lowp_baseline(q, k, v, **kw), (q, k, v), dout)
    for name, a, b, f, w, lo in zip("qkv", det, direct, fused, want, base, strict=True):
        assert torch.equal(a, b)
        assert_lowp_rule(a, w, lo, factor=3.0, what=f"d{name}")
        assert_lowp_rule(f, w, lo, factor=3.0, what=f"d{name}")


def test_head_dim_split_over_programs():
    """split_d=2: two programs per key block, each with half of dK/dV's columns (40 pads to
    64: the second half holds 8 real columns and 24 of padding)."""
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, 40, dtype=torch.float16, requires_grad=True)
    with autotune.override(autotune.Config(16, 32, 1, 1, split_d=2)):
        check(q, k, v, causal=True, mask=lengths_mask([50, 30]))
