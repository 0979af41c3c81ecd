"""float16/bfloat16: scores and softmax in float32, output in the input dtype, and the
derived error bound of DESIGN.md (see tests/helpers.py)."""

import pytest
import torch

import qkv

from helpers import assert_lowp_rule, lowp_baseline, oracle, rand_qkv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (5, 3)}])
def test_low_precision_rule(backend, dtype, kw):
    q, k, v = rand_qkv(2, 6, 3, 37, 53, 24, 16, dtype=dtype, seed=7)
    out = qkv.attention(q, k, v, backend=backend, **kw)
    assert out.dtype == dtype
    want, _ = oracle(q, k, v, **kw)
    assert_lowp_rule(out, want, lowp_baseline(q, k, v, **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(backend, dtype):
    q, k, v = rand_qkv(1, 4, 2, 19, 29, 16, dtype=dtype, seed=3, requires_grad=True)
    dout = torch.randn(1, 4, 19, 16, generator=torch.Generator().manual_seed(9)).to(dtype)
    grads = torch.autograd.grad(qkv.attention(q, k, v, causal=True, backend=backend),
                                (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(qkv.attention(q64, k64, v64, causal=True, backend="reference"),
                               (q64, k64, v64), dout.double())
    base = torch.autograd.grad(lowp_baseline(q, k, v, causal=True), (q, k, v), dout)
    for name, g, w, b in zip("qkv", grads, want, base, strict=True):
        assert g.dtype == dtype
        assert_lowp_rule(g, w, b, factor=5.0, what=f"d{name}")


def test_bf16_large_values_stay_finite(backend):
    """pytorch #121558: bf16 inputs of 133120 overflowed; scores must live in float32."""
    q = torch.full((1, 1, 4, 8), 133120.0, dtype=torch.bfloat16)
    k = torch.full((1, 1, 6, 8), 133120.0, dtype=torch.bfloat16)
    v = torch.randn(1, 1, 6, 8).to(torch.bfloat16)
    out = qkv.attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    # Equal scores everywhere: the output is the mean of the values.
    want = v.float().mean(dim=-2, keepdim=True).expand(1, 1, 4, 8)
    assert torch.allclose(out.float(), want, atol=2e-2)
