"""qkv.capture on plain PyTorch: SDPA calls, nn.MultiheadAttention (slow and fast paths),
nn.TransformerEncoderLayer, qkv.attention; selections, memory, dtypes, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from qkv import functional
from qkv.kernels import chunked

from helpers import rand_qkv


def sdpa_oracle(q, k, *, mask=None, is_causal=False, scale=None):
    """float64 weights of PyTorch's SDPA definition (top-left causal, bool True = keep,
    float added); rows that see nothing are 0. q (B, Hq, Lq, D), k (B, Hkv, Lk, D)."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale  # (B, H, Lq, Lk)
    lq, lk = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    w = torch.softmax(s, dim=-1)
    return torch.nan_to_num(w, nan=0.0)


class Sdpa(nn.Module):
    """A module whose forward is one SDPA call (for module paths)."""

    def forward(self, q, k, v, **kw):
        return F.scaled_dot_product_attention(q, k, v, **kw)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Sdpa(), Sdpa()])

    def forward(self, q, k, v, **kw):
        return self.blocks[1](self.blocks[0](q, k, v, **kw), k, v, **kw)


# ---- SDPA ----------------------------------------------------------------------------------------
CASES = {
    "plain": dict(lq=97, lk=203),
    "causal_square": dict(lq=57, lk=57, is_causal=True),
    "causal_lq_lt_lk": dict(lq=31, lk=70, is_causal=True),  # top-left: keys >= Lq never seen
    "causal_lq_gt_lk": dict(lq=70, lk=31, is_causal=True),
    "bool_mask": dict(lq=40, lk=45, mask="bool"),
    "float_mask": dict(lq=40, lk=45, mask="float"),
    "scale": dict(lq=33, lk=29, scale=0.37),
    "gqa": dict(lq=33, lk=41, gqa=True, is_causal=True),
}


def make_case(lq, lk, *, mask=None, gqa=False, seed=0, dtype=torch.float32, **kw):
    hq, hkv = (6, 3) if gqa else (3, 3)
    q, k, v = rand_qkv(2, hq, hkv, lq, lk, 59, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(2, 1, lq, lk, generator=g) > 0.3
        kw["attn_mask"][0, 0, 3] = False  # one query sees nothing
    elif mask == "float":
        kw["attn_mask"] = torch.randn(2, hq, lq, lk, generator=g).to(dtype)
    if gqa:
        kw["enable_gqa"] = True
    return q, k, v, kw


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_weights_match_the_oracle_and_outputs_are_unchanged(name):
    q, k, v, kw = make_case(**CASES[name])
    net = Net()
    plain = net(q, k, v, **kw)
    with qkv.capture(net) as cap:
        out = net(q, k, v, **kw)
    assert torch.equal(out, plain)
    assert [c.module for c in cap.calls] == ["blocks.0", "blocks.1"]
    want = sdpa_oracle(q, k, mask=kw.get("attn_mask"), is_causal=kw.get("is_causal", False),
                       scale=kw.get("scale"))
    w = cap.weights[0]
    assert w.dtype == torch.float32 and w.shape == want.shape
    assert (w.double() - want).abs().max() <= 1e-5
    c = cap.calls[0]
    assert c.kind == "sdpa" and (c.lq, c.lk, c.heads) == (q.shape[2], k.shape[2], q.shape[1])
    assert c.causal == ("top-left" if kw.get("is_causal") else None)
    assert c.gqa == ("enable_gqa" in kw)
    assert c.scale == pytest.approx(kw.get("scale", 1 / math.sqrt(59)))


def test_positional_arguments_and_dropout_are_recorded():
    q, k, v, _ = make_case(20, 20)
    with qkv.capture() as cap:
        F.scaled_dot_product_attention(q, k, v, None, 0.25, True)
    c = cap.calls[0]
    assert c.dropout == 0.25 and c.causal == "top-left" and c.module == ""
    want = sdpa_oracle(q, k, is_causal=True)  # weights before dropout
    assert (cap.weights[0].double() - want).abs().max() <= 1e-5


# ---- selections and memory -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["causal_lq_lt_lk", "bool_mask", "gqa", "causal_lq_gt_lk"])
def test_selected_heads_and_queries_are_slices_of_the_full_weights(name):
    q, k, v, kw = make_case(**CASES[name])
    net = Net()
    with qkv.capture(net) as full:
        net(q, k, v, **kw)
    rows = [0, 5, -1]
    with qkv.capture(net, layers=[1], heads=[-1, 0], queries=rows) as part:
        net(q, k, v, **kw)
    assert part.weights[0] is None and not part.calls[0].kept
    c = part.calls[1]
    lq = q.shape[2]
    assert c.kept_heads == [q.shape[1] - 1, 0] and c.kept_queries == [0, 5, lq - 1]
    want = full.weights[1][:, c.kept_heads][:, :, c.kept_queries]
    assert torch.allclose(part.weights[1], want, atol=1e-6)
    with qkv.capture(net, layers="blocks.0", queries=slice(2, 9, 3)) as pat:
        net(q, k, v, **kw)
    assert pat.calls[0].kept and not pat.calls[1].kept
    assert torch.allclose(pat.weights[0], full.weights[0][:, :, 2:9:3], atol=1e-6)


@pytest.mark.parametrize("name", ["causal_lq_lt_lk", "causal_lq_gt_lk", "float_mask", "gqa"])
def test_block_by_block_weights_equal_the_direct_ones(name):
    """budget=0 sends every call through the chunked backend (weights from the lse)."""
    q, k, v, kw = make_case(**CASES[name])
    with qkv.capture() as direct:
        F.scaled_dot_product_attention(q, k, v, **kw)
    with qkv.capture(budget=0) as blocks:
        F.scaled_dot_product_attention(q, k, v, **kw)
    with qkv.capture(budget=0, heads=[1], queries=[3, 0]) as sel:
        F.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.allclose(blocks.weights[0], direct.weights[0], atol=1e-6)
    assert torch.allclose(sel.weights[0], direct.weights[0][:, [1]][:, :, [3, 0]], atol=1e-6)


class _Largest(TorchDispatchMode):
    """The sizes (elements) of every tensor an operation produces, and the distinct
    storages of at least ``big`` bytes behind them (views share their base's storage)."""

    def __init__(self, big: int = 1 << 62):
        super().__init__()
        self.sizes, self.big, self.storages = [], big, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
                st = t.untyped_storage()
                if st.nbytes() >= self.big:
                    self.storages.add((st.data_ptr(), st.nbytes()))
        return out


def test_one_head_four_rows_of_a_long_causal_call_allocate_nothing_of_l_by_l(monkeypatch):
    monkeypatch.setattr(chunked, "WORKERS", 1)  # every op on this thread, where we watch
    length = 8192
    q, k, v = rand_qkv(1, 2, 2, length, length, 16, dtype=torch.float32, seed=3)
    with _Largest() as watch, qkv.capture(heads=[1], queries=[0, 100, 4000, -1]) as cap:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert cap.weights[0].shape == (1, 1, 4, length)
    assert len(watch.sizes) > 10 and max(watch.sizes) < length * length // 64
    want = sdpa_oracle(q[:, 1:, [0, 100, 4000, -1]], k[:, 1:], is_causal=False,
                       mask=torch.arange(length)[None, :] <= torch.tensor(
                           [0, 100, 4000, length - 1])[:, None])
    assert (cap.weights[0].double() - want).abs().max() <= 1e-5


def test_above_the_budget_only_the_kept_weights_are_l_by_l(monkeypatch):
    monkeypatch.setattr(chunked, "WORKERS", 1)
    length = 1024
    q, k, v = rand_qkv(1, 2, 2, length, length, 16, dtype=torch.float32, seed=4)
    with _Largest(big=length * length * 4) as watch, qkv.capture(budget=1 << 20) as cap:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # the weights kept (2 heads x L x L float32), nothing else of that size
    assert [n for _, n in watch.storages] == [2 * length * length * 4]
    assert (cap.weights[0].double() - sdpa_oracle(q, k, is_causal=True)).abs().max() <= 1e-5


# ---- dtypes and autograd -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_models_give_float32_weights(dtype):
    q, k, v, kw = make_case(**CASES["causal_lq_lt_lk"], dtype=dtype)
    plain = F.scaled_dot_product_attention(q, k, v, **kw)
    with qkv.capture() as cap:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.equal(out, plain)
    assert cap.weights[0].dtype == torch.float32 and cap.calls[0].dtype == dtype
    # exact for the inputs given: the same low-precision q and k, in float64
    assert (cap.weights[0].double() - sdpa_oracle(q, k, is_causal=True)).abs().max() <= 1e-5


@pytest.mark.parametrize("ctx", ["grad", "no_grad", "inference_mode"])
def test_works_with_and_without_autograd(ctx):
    q, k, v, kw = make_case(**CASES["gqa"])
    q.requires_grad_(True)
    guard = {"grad": torch.enable_grad, "no_grad": torch.no_grad,
             "inference_mode": torch.inference_mode}[ctx]
    with guard(), qkv.capture() as cap:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert not cap.weights[0].requires_grad
    assert out.requires_grad == (ctx == "grad")
    if ctx == "grad":
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()


# ---- nn.MultiheadAttention and nn.TransformerEncoderLayer ---------------------------------------
def mha_reference(mod, *args, **kw):
    """The module's own per-head weights (its need_weights path), outside any capture."""
    kw = {**kw, "need_weights": True, "average_attn_weights": False}
    return mod(*args, **kw)[1]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float"])
def test_multihead_attention_slow_and_fast_paths(batch_first, fast, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(30, 5, batch_first=batch_first).eval()
    x = torch.randn(3, 11, 30) if batch_first else torch.randn(11, 3, 30)
    kw = {}
    if masks == "bool":
        kpm = torch.zeros(3, 11, dtype=torch.bool)
        kpm[1, 7:] = True
        kw["key_padding_mask"] = kpm
    elif masks == "float":
        kw["attn_mask"] = torch.randn(11, 11)
    guard = torch.no_grad if fast else torch.enable_grad
    with guard():
        plain = mha(x, x, x, need_weights=False, **kw)[0]
        with qkv.capture(mha) as cap:
            out = mha(x, x, x, need_weights=False, **kw)[0]
        want = mha_reference(mha, x, x, x, **kw)
    assert torch.equal(out, plain)  # the fused fast path still ran when it could
    assert len(cap.calls) == 1 and cap.calls[0].kind == "multihead_attention"
    assert cap.calls[0].module == ""
    assert (cap.weights[0] - want).abs().max() <= 1e-5


def test_multihead_attention_with_kdim_bias_k_and_zero_attn():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(12, 3, kdim=7, vdim=5, add_bias_kv=True, add_zero_attn=True,
                                batch_first=True).eval()
    x, ctx = torch.randn(2, 6, 12), torch.randn(2, 9, 7)
    val = torch.randn(2, 9, 5)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, -2:] = True
    am = torch.rand(6, 9) > 0.2
    with qkv.capture(mha) as cap:
        mha(x, ctx, val, key_padding_mask=kpm, attn_mask=am)
    want = mha_reference(mha, x, ctx, val, key_padding_mask=kpm, attn_mask=am)
    assert cap.weights[0].shape == (2, 3, 6, 11)
    assert (cap.weights[0] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_fast_path_is_recorded(norm_first):
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first,
                                       dropout=0.0).eval()
    x = torch.randn(2, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    with torch.no_grad():
        plain = layer(x, src_key_padding_mask=kpm)
        with qkv.capture(layer) as cap:
            out = layer(x, src_key_padding_mask=kpm)
        h = layer.norm1(x) if norm_first else x
        want = mha_reference(layer.self_attn, h, h, h, key_padding_mask=kpm)
    assert torch.equal(out, plain)
    assert [c.module for c in cap.calls] == ["self_attn"]
    assert (cap.weights[0] - want).abs().max() <= 1e-5


# ---- qkv.attention -------------------------------------------------------------------------------
def test_qkv_attention_is_recorded_once_with_its_bottom_right_causal_and_window():
    q, k, v = rand_qkv(2, 4, 2, 30, 50, 19, dtype=torch.float32, seed=5)
    for backend in ("torch", "reference", "chunked"):
        plain = qkv.attention(q, k, v, causal=True, window=(7, None), backend=backend)
        with qkv.capture() as cap:
            out = qkv.attention(q, k, v, causal=True, window=(7, None), backend=backend)
        assert torch.equal(out, plain)
        assert len(cap.calls) == 1, backend  # its inner SDPA call is not a second call
        c = cap.calls[0]
        assert c.kind == "qkv.attention" and c.causal == "bottom-right" and c.window == (7, None)
        _, want = qkv.attention(q.double(), k.double(), v.double(), causal=True,
                                window=(7, None), return_weights=True, backend="reference")
        assert (cap.weights[0].double() - want).abs().max() <= 1e-5


def test_qkv_module_calls_carry_their_module_path():
    torch.manual_seed(6)
    net = nn.Sequential(qkv.MultiHeadAttention(16, 4), nn.Identity())
    x = torch.randn(2, 7, 16)
    with qkv.capture(net) as cap:
        net[0](x, causal=True)
    assert [c.module for c in cap.calls] == ["0"]
    _, want = net[0](x, causal=True, need_weights=True)
    assert (cap.weights[0] - want).abs().max() <= 1e-5


# ---- maps ----------------------------------------------------------------------------------------
def test_to_map_holds_one_layer_per_call_and_the_causal_triangle():
    q, k, v, kw = make_case(12, 12, is_causal=True)
    net = Net()
    with qkv.capture(net, heads=[0, 2]) as cap:
        net(q, k, v, **kw)
    toks = [f"t{i}" for i in range(12)]
    amap = cap.to_map(toks, batch=1)
    assert amap.weights.shape == (2, 2, 12, 12) and amap.head_labels == ["0", "2"]
    assert torch.allclose(torch.from_numpy(amap.weights[0]), cap.weights[0][1])
    assert (amap.allowed == torch.ones(12, 12, dtype=torch.bool).tril().numpy()).all()
    rows = qkv.capture(net, queries=[3, 7])
    with rows:
        net(q, k, v, **kw)
    part = rows.to_map(toks)
    assert part.tokens == ["t3", "t7"] and part.key_tokens == toks
    assert part.allowed[0].sum() == 4 and part.allowed[1].sum() == 8


def test_to_map_errors_name_the_fix():
    q, k, v, _ = make_case(10, 14)
    with qkv.capture() as cap:
        F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, q, q)
    with pytest.raises(ValueError, match="key_tokens"):
        cap.to_map(list("abcdefghij"), calls=[0])
    with pytest.raises(ValueError, match="calls="):
        cap.to_map(list("abcdefghij"), key_tokens=list("abcdefghijklmn"))
    with pytest.raises(ValueError, match="one token per query"):
        cap.to_map(list("abc"), calls=[1])
    with pytest.raises(ValueError, match="batch 5"):
        cap.to_map(list("abcdefghij"), calls=[1], batch=5)


def test_hand_written_attention_is_not_seen():
    q, k, v, _ = make_case(8, 8)
    with qkv.capture() as cap:
        torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v
    assert cap.calls == [] and cap.weights == []
    with pytest.raises(ValueError, match="by hand"):
        cap.to_map(list("abcdefgh"))


# ---- errors and clean-up -------------------------------------------------------------------------
def test_bad_arguments_are_refused_with_what_to_do():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        qkv.capture("model")
    with pytest.raises(TypeError, match="layers must hold"):
        qkv.capture(layers=[1.5])
    with pytest.raises(TypeError, match="heads must be ints"):
        qkv.capture(heads=["a"])
    with pytest.raises(ValueError, match="budget"):
        qkv.capture(budget=-1)
    q, k, v, _ = make_case(8, 8)
    with pytest.raises(ValueError, match="heads 7 is out of range"), qkv.capture(heads=[7]):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="cannot be nested"), qkv.capture(), qkv.capture():
        pass


def test_everything_is_restored_after_the_block_even_on_error():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(ZeroDivisionError), qkv.capture(mha):
        assert "forward" in mha.__dict__ and functional._observers
        1 / 0  # noqa: B018
    assert "forward" not in mha.__dict__ and not functional._observers
    assert not nn.modules.module._global_forward_pre_hooks
    assert not nn.modules.module._global_forward_hooks
    q, k, v, _ = make_case(8, 8)
    with qkv.capture() as cap:
        pass
    F.scaled_dot_product_attention(q, k, v)
    assert cap.calls == []


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_on_its_nested_tensor_path():
    """Eval + key padding: nn.TransformerEncoder packs the batch into a nested tensor; the
    weights come back padded to the longest row (Lmax x Lmax)."""
    torch.manual_seed(3)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)
    enc.eval()
    x = torch.randn(2, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 7:] = True
    kpm[1, 6:] = True
    with torch.no_grad():
        plain = enc(x, src_key_padding_mask=kpm)
        with qkv.capture(enc) as cap:
            out = enc(x, src_key_padding_mask=kpm)
        want = mha_reference(enc.layers[0].self_attn, x, x, x, key_padding_mask=kpm)
    assert torch.equal(out, plain)
    assert [c.module for c in cap.calls] == ["layers.0.self_attn", "layers.1.self_attn"]
    w = cap.weights[0]
    assert w.shape == (2, 4, 7, 7)
    assert (w[0] - want[0, :, :7, :7]).abs().max() <= 1e-5
    assert (w[1, :, :6] - want[1, :, :6, :7]).abs().max() <= 1e-5  # the real rows


@pytest.mark.parametrize(("slab", "threads"), [(1, 3), (300, 2), (1 << 20, 1)])
@pytest.mark.parametrize("name", ["bool_mask", "float_mask", "gqa", "causal_lq_gt_lk"])
def test_direct_weights_do_not_depend_on_slabs_or_threads(monkeypatch, name, slab, threads):
    """One row of one head at a time, a few rows, or many heads at once, on 1-3 threads:
    the same weights."""
    from qkv import capture_weights

    q, k, v, kw = make_case(**CASES[name])
    monkeypatch.setattr(capture_weights, "SLAB_ELEMENTS", slab)
    monkeypatch.setattr(chunked, "WORKERS", threads)
    with qkv.capture() as cap:
        F.scaled_dot_product_attention(q, k, v, **kw)
    want = sdpa_oracle(q, k, mask=kw.get("attn_mask"), is_causal=kw.get("is_causal", False),
                       scale=kw.get("scale"))
    assert (cap.weights[0].double() - want).abs().max() <= 1e-5
