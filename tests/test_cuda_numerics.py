"""NaN and inf through ``auto`` and the torch backend on a CUDA device (skipped without one).

On CUDA the torch backend skips its NaN/inf check for a signature where the probe
(``torch_sdpa._probe``) finds every SDPA kernel propagating NaN and inf as the oracle does.
These cases plant NaN/inf the way users meet them (one element, a whole key) and compare
with the float64 oracle: the same NaN pattern, the finite values by the derived rule.
"""

import pytest
import torch

import qkv

from helpers import assert_grads_lowp_rule, assert_lowp_rule, lowp_baseline, oracle, rand_qkv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 20), (5, 5), (37, 37), (64, 300)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["q element", "k element", "k row"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_plain_calls_follow_the_oracle(dtype, shape, value, where, backend):
    lq, lk = shape
    for causal in (False, True) if lq in (1, lk) else (False,):
        q, k, v = (t.cuda() for t in rand_qkv(1, 4, 2, lq, lk, 64, dtype=dtype, seed=lk))
        if where == "q element":
            q[0, 1, lq // 2, 3] = value
        elif where == "k element":
            k[0, 0, lk // 2, 5] = value
        else:
            k[0, 1, 0] = value  # key 0: seen by every row, causal too
        for _ in range(2):  # the first call decides the plan, the second takes it
            out = qkv.attention(q, k, v, causal=causal, backend=backend)
        want, _ = oracle(q, k, v, causal=causal)
        want = want.to(out.device)
        assert torch.equal(out.isnan(), want.isnan()), (causal, where)
        ok = ~want.isnan()
        assert_lowp_rule(out[ok], want[ok], lowp_baseline(q, k, v, causal=causal)[ok])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (7, 3)},
                                {"mask": "padding"}])
def test_chunked_on_cuda_follows_the_oracle(dtype, kw):
    """The chunked backend (what the torch backend hands NaN/inf calls to) on CUDA tensors:
    outputs and gradients by the derived rule, odd sizes."""
    q, k, v = (t.cuda().requires_grad_() for t in rand_qkv(2, 6, 3, 97, 203, 40, 24,
                                                            dtype=dtype, seed=7))
    if kw.get("mask") == "padding":
        kw = {"mask": qkv.padding_mask(torch.tensor([203, 61], device="cuda"), 203)}
    out = qkv.attention(q, k, v, backend="chunked", **kw)
    want, _ = oracle(q, k, v, **kw)
    assert_lowp_rule(out, want.to(out.device), lowp_baseline(q, k, v, **kw))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    assert_grads_lowp_rule(torch.autograd.grad(out, (q, k, v), dout), q, k, v, dout, **kw)
