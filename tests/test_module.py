"""qkv.MultiHeadAttention and qkv.KVCache."""

import numpy as np
import pytest
import torch
from torch import nn

import qkv
from qkv import reference_numpy

TOL = 1e-10


def x_(b, l, e, seed=0):
    return torch.randn(b, l, e, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_dims", [(None, None), (5, 7)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_from_torch_matches_torch(bias, kv_dims, batch_first):
    torch.manual_seed(0)
    kdim, vdim = kv_dims
    ref = nn.MultiheadAttention(12, 3, bias=bias, kdim=kdim, vdim=vdim,
                                batch_first=batch_first).double().eval()
    ours = qkv.MultiHeadAttention.from_torch(ref)
    x = x_(2, 5, 12)
    key = x_(2, 9, kdim or 12, 1)
    val = x_(2, 9, vdim or 12, 2)
    args = (x, key, val) if batch_first else (x.transpose(0, 1), key.transpose(0, 1),
                                              val.transpose(0, 1))
    want, want_w = ref(*args, need_weights=True, average_attn_weights=False)
    if not batch_first:
        want = want.transpose(0, 1)
    got, w = ours.forward_kv(x, key, val, need_weights=True)
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    assert torch.allclose(w, want_w, atol=TOL, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_dims", [(None, None), (6, 10)])
def test_to_torch_roundtrip(bias, kv_dims):
    torch.manual_seed(1)
    ours = qkv.MultiHeadAttention(8, 2, bias=bias, kdim=kv_dims[0], vdim=kv_dims[1]).double()
    theirs = ours.to_torch()
    assert theirs.batch_first
    x, key, val = x_(3, 4, 8), x_(3, 6, kv_dims[0] or 8, 1), x_(3, 6, kv_dims[1] or 8, 2)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[:, 0] = True
    want, _ = theirs(x, key, val, attn_mask=~mask)  # torch: True = hidden
    assert torch.allclose(ours.forward_kv(x, key, val, mask=mask), want, atol=TOL, rtol=0)
    back = qkv.MultiHeadAttention.from_torch(theirs)
    for a, b in zip(ours.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_conversion_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="add_bias_kv"):
        qkv.MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="GQA"):
        qkv.MultiHeadAttention(8, 4, num_kv_heads=2).to_torch()
    with pytest.raises(TypeError):
        qkv.MultiHeadAttention.from_torch(nn.Linear(2, 2))


def test_matches_numpy_oracle_with_gqa_and_cross_attention():
    torch.manual_seed(2)
    m = qkv.MultiHeadAttention(12, 6, num_kv_heads=2, kdim=5, vdim=5).double()
    x, ctx = x_(2, 7, 12), x_(2, 9, 5, 1)
    keep = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    out, w = m(x, ctx, mask=keep, need_weights=True)
    p = {n: t.detach().numpy() for n, t in m.named_parameters()}
    want, want_w = reference_numpy.multi_head_attention(
        x.numpy(), ctx.numpy(), p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"],
        p["out_proj.weight"], p["q_proj.bias"], p["k_proj.bias"], p["v_proj.bias"],
        p["out_proj.bias"], num_heads=6, num_kv_heads=2, mask=keep.numpy())
    assert w.shape == (2, 6, 7, 9)
    assert np.allclose(out.detach().numpy(), want, atol=TOL)
    assert np.allclose(w.detach().numpy(), want_w, atol=TOL)


def test_gqa_equals_repeated_kv_heads():
    torch.manual_seed(3)
    gqa = qkv.MultiHeadAttention(16, 4, num_kv_heads=2).double()
    mha = qkv.MultiHeadAttention(16, 4).double()
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for src, dst in ((gqa.k_proj, mha.k_proj), (gqa.v_proj, mha.v_proj)):
            # kv head h serves query heads 2h and 2h+1: repeat each head's rows twice.
            w = src.weight.view(2, 4, 16).repeat_interleave(2, dim=0).reshape(16, 16)
            dst.weight.copy_(w)
            dst.bias.copy_(src.bias.view(2, 4).repeat_interleave(2, dim=0).reshape(16))
    x = x_(2, 6, 16)
    assert torch.allclose(gqa(x, causal=True), mha(x, causal=True), atol=TOL, rtol=0)


def test_multi_head_equals_per_head_calls_concatenated():
    torch.manual_seed(4)
    m = qkv.MultiHeadAttention(12, 3).double()
    x = x_(2, 5, 12)
    q = m._split(m.q_proj(x), 3)
    k = m._split(m.k_proj(x), 3)
    v = m._split(m.v_proj(x), 3)
    heads = [qkv.attention(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1]) for h in range(3)]
    concat = torch.cat(heads, dim=1).transpose(1, 2).reshape(2, 5, 12)  # (B, L, H*Dh)
    assert torch.allclose(m(x), m.out_proj(concat), atol=TOL, rtol=0)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_kv_cache_decoding_equals_full_causal_forward(num_kv_heads):
    torch.manual_seed(5)
    m = qkv.MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads).double().eval()
    x = x_(2, 40, 16)  # longer than the cache's first capacity: exercises growth
    full = m(x, causal=True)
    cache = qkv.KVCache()
    steps = [m(x[:, :3], causal=True, cache=cache)]  # a prompt, then one token at a time
    steps += [m(x[:, t : t + 1], causal=True, cache=cache) for t in range(3, 40)]
    assert len(cache) == 40
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=TOL, rtol=0)


def test_cross_attention_cache_projects_context_once():
    torch.manual_seed(6)
    m = qkv.MultiHeadAttention(8, 2).double()
    x, ctx = x_(1, 3, 8), x_(1, 5, 8, 1)
    cache = qkv.KVCache()
    first = m(x[:, :1], ctx, cache=cache)
    second = m(x[:, 1:2], ctx, cache=cache)
    assert len(cache) == 5  # the context stayed as it was
    full = m(x, ctx)
    assert torch.allclose(torch.cat([first, second], 1), full[:, :2], atol=TOL, rtol=0)


def test_kv_cache_reorder_and_errors():
    cache = qkv.KVCache()
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 4)
    cache.append(k, k)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="batch"):
        cache.append(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))
    with pytest.raises(ValueError, match="expects"):
        cache.append(torch.zeros(3, 1, 4), torch.zeros(3, 1, 4))


def test_dropout_only_in_training_and_reproducible():
    torch.manual_seed(7)
    m = qkv.MultiHeadAttention(8, 2, dropout=0.5).double()
    x = x_(2, 6, 8)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, m.eval()(x))


def test_functional_dropout_generator_reproducible_and_unbiased():
    q = torch.randn(1, 1, 200, 4, dtype=torch.float64)
    k = torch.randn(1, 1, 300, 4, dtype=torch.float64)
    v = torch.ones(1, 1, 300, 1, dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, wa = qkv.attention(q, k, v, dropout=0.3, generator=g1, return_weights=True)
    b = qkv.attention(q, k, v, dropout=0.3, generator=g2, return_weights=False,
                      backend="reference")
    assert torch.equal(a, b)
    assert torch.allclose(a, wa.sum(-1, keepdim=True))  # the weights returned are applied
    zeros = float((wa == 0).double().mean())
    assert abs(zeros - 0.3) < 0.01  # 60,000 draws: 0.01 is > 5 standard deviations
    assert abs(float(a.mean()) - 1.0) < 0.02  # inverted dropout keeps the expectation


def test_module_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        qkv.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="GQA"):
        qkv.MultiHeadAttention(12, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        qkv.MultiHeadAttention(8, 2, dropout=1.0)
    m = qkv.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"\(B, L, 8\)"):
        m(torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="context"):
        m(torch.zeros(2, 3, 8), torch.zeros(3, 3, 8))
    with pytest.raises(TypeError, match="KVCache"):
        m(torch.zeros(2, 3, 8), cache={})
