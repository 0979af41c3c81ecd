"""The cheap common path keeps every check's meaning.

qkv.attention caches, per signature of a plain call, what it validated and which backend
it chose; MultiHeadAttention projects q, k and v with one matmul when no gradient is
needed. These tests change what the cache keys on, or what the packed matmul reads, and
check the result is still validated and still right.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import qkv
from qkv import functional, kernels
from qkv.kernels.reference import ReferenceBackend
from qkv.positional import RotaryEmbedding

from helpers import assert_lowp_rule, lowp_baseline, oracle, rand_qkv


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_repeated_plain_calls_match_the_oracle(lead, causal):
    q, k, v = _rand(*lead, 3, 7, 5, seed=1), _rand(*lead, 3, 9, 5, seed=2), \
        _rand(*lead, 3, 9, 4, seed=3)
    for i in range(3):  # the first call plans, the others reuse the plan
        qi, ki, vi = q + i, k - i, v * (i + 1)
        out = qkv.attention(qi, ki, vi, causal=causal)
        want = oracle(qi, ki, vi, causal=causal)[0]
        assert out.shape == (*lead, 3, 7, 4)
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])  # True: a plan that is not SDPA's runner
def test_a_cached_signature_does_not_let_bad_inputs_through(causal):
    q, k, v = _rand(1, 2, 3, 4), _rand(1, 2, 5, 4), _rand(1, 2, 5, 4)
    functional._PLANS.clear()
    qkv.attention(q, k, v, causal=causal)
    qkv.attention(q, k, v, causal=causal)
    (plan,) = functional._PLANS.values()
    assert _is_runner(plan[0]) is not causal
    # k's and v's dtypes and devices are not in the signature: the plan refuses them
    for bad in [(q, k.double(), v), (q, k, v.double()), (q, k, v.bfloat16()),
                (q, k.half(), v.half())]:
        with pytest.raises(TypeError, match="share one dtype"):
            qkv.attention(*bad, causal=causal)
    with pytest.raises(TypeError, match="floating-point"):
        qkv.attention(q, k.long(), v, causal=causal)
    for bad in [(q, k.to("meta"), v), (q, k, v.to("meta"))]:
        with pytest.raises(ValueError, match="one device"):
            qkv.attention(*bad, causal=causal)
    assert len(functional._PLANS) == 1
    with pytest.raises(TypeError, match="share one dtype"):
        qkv.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="head dim"):
        qkv.attention(q, _rand(1, 2, 5, 3), v)
    with pytest.raises(ValueError, match="scale"):
        qkv.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="causal"):
        qkv.attention(q, k, v, causal=1)


def test_scale_is_part_of_the_signature():
    q, k, v = _rand(1, 2, 3, 4), _rand(1, 2, 5, 4), _rand(1, 2, 5, 4)
    a = qkv.attention(q, k, v, scale=0.5)
    b = qkv.attention(q, k, v, scale=2.0)
    torch.testing.assert_close(b.double(), oracle(q, k, v, scale=2.0)[0], atol=2e-6,
                               rtol=1e-5)
    assert not torch.allclose(a, b)


def test_register_forgets_the_cached_choices():
    q, k, v = _rand(1, 2, 3, 4), _rand(1, 2, 5, 4), _rand(1, 2, 5, 4)
    qkv.attention(q, k, v)
    calls = []

    class Spy(ReferenceBackend):
        name = "torch"  # takes the place auto gives the SDPA backend

        def run(self, call):
            calls.append(call)
            return super().run(call)

    old = kernels.get("torch")
    try:
        kernels.register(Spy())
        qkv.attention(q, k, v)
        qkv.attention(q, k, v)
        assert len(calls) == 2
    finally:
        kernels.register(old)
    qkv.attention(q, k, v)
    assert len(calls) == 2


def test_the_memory_budget_is_part_of_the_signature(monkeypatch):
    q, k, v = _rand(1, 2, 3, 4), _rand(1, 2, 5, 4), _rand(1, 2, 5, 4)
    qkv.attention(q, k, v)
    chosen = []
    monkeypatch.setattr(kernels, "REFERENCE_MEMORY_BUDGET", 0)
    chunked = kernels.get("chunked")
    monkeypatch.setattr(type(chunked), "run", lambda self, call: chosen.append(1) or
                        (torch.zeros(*call.q.shape[:3], call.v.shape[-1]), None))
    monkeypatch.setattr(kernels.get("torch"), "unsupported", lambda call: "spied")
    qkv.attention(q, k, v)
    assert chosen == [1]


def test_debug_logging_still_says_what_auto_chose(caplog):
    q, k, v = _rand(1, 2, 3, 4), _rand(1, 2, 5, 4), _rand(1, 2, 5, 4)
    qkv.attention(q, k, v)
    with caplog.at_level(logging.DEBUG, logger="qkv"):
        qkv.attention(q, k, v)
    assert any("auto chose" in r.getMessage() for r in caplog.records)


# ---- MultiHeadAttention's packed projection ----------------------------------------------
def _separate(mha: qkv.MultiHeadAttention, x):
    """The module's function written out with its three projections, with gradients on."""
    with torch.enable_grad():
        return mha(x.clone().requires_grad_()).detach()


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_packed_projection_equals_the_separate_ones(kv_heads):
    torch.manual_seed(0)
    mha = qkv.MultiHeadAttention(30, 6, num_kv_heads=kv_heads).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_()
    assert mha._packed_in_proj() is not None
    x = _rand(2, 7, 30, seed=4)
    with torch.no_grad():
        out = mha(x)
    torch.testing.assert_close(out, _separate(mha, x), atol=1e-5, rtol=1e-5)


def test_packed_projection_reads_live_parameters():
    torch.manual_seed(0)
    mha = qkv.MultiHeadAttention(16, 2).eval()
    x = _rand(1, 5, 16, seed=5)
    with torch.no_grad():
        mha.k_proj.weight.data.mul_(3.0)  # .data: no version bump, still seen
        mha.v_proj.bias.data.add_(1.0)
        out = mha(x)
    torch.testing.assert_close(out, _separate(mha, x), atol=1e-5, rtol=1e-5)


def test_re_pointed_parameters_turn_packing_off():
    torch.manual_seed(0)
    mha = qkv.MultiHeadAttention(16, 2).eval()
    mha.k_proj.weight.data = torch.randn(16, 16)
    assert mha._packed_in_proj() is None
    x = _rand(1, 5, 16, seed=6)
    with torch.no_grad():
        out = mha(x)
    torch.testing.assert_close(out, _separate(mha, x), atol=1e-5, rtol=1e-5)
    sd = {k: torch.randn_like(v) for k, v in mha.state_dict().items()}
    mha.load_state_dict(sd, assign=True)
    with torch.no_grad():
        out = mha(x)
    torch.testing.assert_close(out, _separate(mha, x), atol=1e-5, rtol=1e-5)


def test_hooks_on_the_projections_still_fire():
    mha = qkv.MultiHeadAttention(16, 2).eval()
    seen = []
    mha.q_proj.register_forward_hook(lambda m, i, o: seen.append("q"))
    mha.out_proj.register_forward_hook(lambda m, i, o: seen.append("o"))
    with torch.no_grad():
        mha(_rand(1, 5, 16))
    assert seen == ["q", "o"]
    seen.clear()
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__))
    try:
        mha2 = qkv.MultiHeadAttention(16, 2).eval()
        with torch.no_grad():
            mha2(_rand(1, 5, 16))
    finally:
        handle.remove()
    assert seen.count("Linear") == 4


def test_conversion_re_packs_and_stays_right():
    torch.manual_seed(0)
    mha = qkv.MultiHeadAttention(16, 2).eval().double()
    assert mha._packed_in_proj() is not None
    x = _rand(1, 5, 16, seed=7, dtype=torch.float64)
    with torch.no_grad():
        out = mha(x)
    torch.testing.assert_close(out, _separate(mha, x))


def test_packed_path_and_kv_cache_decode_like_the_full_causal_forward():
    torch.manual_seed(0)
    rot = RotaryEmbedding(8)
    mha = qkv.MultiHeadAttention(16, 2, rotary=rot).eval()
    x = _rand(1, 6, 16, seed=8)
    with torch.no_grad():
        full = mha(x, causal=True)
        cache = qkv.KVCache()
        steps = [mha(x[:, t : t + 1], causal=True, cache=cache) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# ---- the torch backend's precomputed runner ------------------------------------------------
def _plan_of(q, k, v, **kw):
    """The plan remembered for this plain call's signature (made by a first call)."""
    functional._PLANS.clear()
    qkv.attention(q, k, v, **kw)
    (plan,) = functional._PLANS.values()
    return plan


def _is_runner(run) -> bool:
    """The plan is the torch backend's precomputed runner (SDPA itself, SDPA with options
    fixed, or either with the NaN/inf check), not the generic one that builds a Call."""
    return not getattr(run, "__qualname__", "").startswith("_remember.")


# (lq, lk, causal, takes the precomputed runner): square causal passes is_causal to SDPA,
# one causal query sees every key, any other causal band needs the backend's dense mask.
_RUNNER_CASES = [(1, 20, False, True), (1, 20, True, True), (7, 7, True, True),
                 (5, 9, False, True), (5, 9, True, False), (9, 5, True, False)]


@pytest.mark.parametrize("lq,lk,causal,fast", _RUNNER_CASES)
@pytest.mark.parametrize("hq,hkv", [(3, 3), (6, 3), (5, 1)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_plan_runner_matches_the_oracle_and_the_full_path(lq, lk, causal, fast, hq, hkv,
                                                          scale):
    q, k, v = rand_qkv(2, hq, hkv, lq, lk, 11, 6, dtype=torch.float32, seed=lq + lk)
    run, _ = _plan_of(q, k, v, causal=causal, scale=scale)
    assert _is_runner(run) is fast
    for i in range(2):  # planned calls on new values
        qi, ki, vi = q * (i + 2), k - i, v + i
        out = qkv.attention(qi, ki, vi, causal=causal, scale=scale)
        want = oracle(qi, ki, vi, causal=causal, scale=scale)[0]
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
        full = qkv.attention(qi, ki, vi, causal=causal, scale=scale, backend="torch")
        torch.testing.assert_close(out, full, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lq,lk,causal", [(1, 20, True), (8, 8, True), (4, 13, False)])
def test_plan_runner_keeps_the_precision_rule(dtype, lq, lk, causal):
    q, k, v = rand_qkv(1, 4, 2, lq, lk, 16, dtype=dtype, seed=3)
    run, _ = _plan_of(q, k, v, causal=causal)
    assert _is_runner(run)
    out = qkv.attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    want = oracle(q, k, v, causal=causal)[0]
    if dtype == torch.float64:
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    else:
        assert_lowp_rule(out, want, lowp_baseline(q, k, v, causal=causal))


def test_plan_runner_gradients_match_the_oracle_path():
    q, k, v = rand_qkv(2, 4, 2, 6, 6, 5, dtype=torch.float64, seed=4, requires_grad=True)
    _plan_of(q.detach(), k.detach(), v.detach(), causal=True)
    assert torch.autograd.gradcheck(lambda a, b, c: qkv.attention(a, b, c, causal=True),
                                    (q, k, v))
    out = qkv.attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = qkv.attention(q, k, v, causal=True, backend="reference")
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_a_subclass_that_overrides_run_sees_every_planned_call():
    q, k, v = _rand(1, 2, 3, 4), _rand(1, 2, 5, 4), _rand(1, 2, 5, 4)
    calls = []

    class Spy(type(kernels.get("torch"))):
        def run(self, call):
            calls.append(call)
            return super().run(call)

    old = kernels.get("torch")
    try:
        kernels.register(Spy())
        for _ in range(3):
            qkv.attention(q, k, v)
        assert len(calls) == 3
    finally:
        kernels.register(old)


@pytest.mark.parametrize("causal,lq", [(False, 1), (False, 5), (True, 1), (True, 5)])
def test_planned_calls_propagate_nan_like_the_first_call(causal, lq):
    # NaN in a query propagates to its output row (docs/semantics.md); the planned call
    # must do what the first, fully checked call did, and leave the other rows finite.
    q, k, v = torch.randn(1, 2, lq, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    q[0, 0, 0, 3] = float("nan")
    for _ in range(3):  # the first call makes the plan, the others use it
        out = qkv.attention(q, k, v, causal=causal)  # (1, 2, lq, 8)
        assert out[0, 0, 0].isnan().all()
        assert torch.isfinite(out[0, 1]).all() and torch.isfinite(out[0, 0, 1:]).all()


# ---- NaN in the planned calls ----------------------------------------------------------------
# SDPA's CPU flash kernel returns 0, not NaN, for a row whose visible scores are all NaN when
# the row's key block is shorter than one SIMD vector (Lk < 16 float32 lanes with AVX-512).
# The plan decides per signature whether the torch backend must fix such rows up; these
# cover every class the plan distinguishes: no mask with one or many queries, causal with
# one query (no key hidden), square causal; Lk below and above the vector width; grouped
# heads; every dtype.
_NAN_CASES = [  # (hq, hkv, lq, lk, causal)
    (4, 4, 1, 20, False), (4, 4, 1, 3, False), (4, 2, 1, 1, False), (3, 3, 5, 9, False),
    (4, 2, 4, 40, False), (4, 4, 1, 20, True), (2, 2, 1, 7, True), (4, 2, 6, 6, True),
    (3, 3, 20, 20, True),
]
_NAN_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _poison(q, k, v, where: str):
    """q, k, v with NaN put in: one query element, one key element (key 0, seen by every
    row; or the last key), every key of kv head 0, or one value element."""
    q, k, v = q.clone(), k.clone(), v.clone()
    if where == "q":
        q[0, 0, -1, 1] = float("nan")
    elif where in ("q+inf", "q-inf"):  # that row's scores are +-inf: NaN
        q[0, 0, -1, 1] = float(where[1:])
    elif where == "k0":
        k[0, 0, 0, 2] = float("nan")
    elif where in ("k0+inf", "k0-inf"):  # +inf scores (NaN rows) or -inf (key 0 unseen)
        k[0, 0, 0, 2] = float(where[2:])
    elif where == "k_all":
        k[0, 0, :, 0] = float("nan")
    elif where == "k_last":  # the last key: causal hides it from every row but the last
        k[0, 0, -1, 2] = float("nan")
    else:
        v[0, -1, 0, 1] = float("nan")
    return q, k, v


@pytest.mark.parametrize("hq,hkv,lq,lk,causal", _NAN_CASES)
@pytest.mark.parametrize("dtype", _NAN_DTYPES)
@pytest.mark.parametrize("where", ["q", "k0", "k_all", "v", "q+inf", "q-inf", "k0+inf",
                                   "k0-inf"])
def test_planned_calls_propagate_nan_as_the_float64_oracle(hq, hkv, lq, lk, causal, dtype,
                                                           where):
    # docs/semantics.md: NaN in a query, or in a key a row can see, makes that row NaN; NaN
    # in a visible value makes that column NaN; nothing else.
    clean = rand_qkv(2, hq, hkv, lq, lk, 16, dtype=dtype, seed=lq * 31 + lk)
    q, k, v = _poison(*clean, where)
    want = oracle(q, k, v, causal=causal)[0].isnan()  # (2, hq, lq, 16)
    assert not want.all()
    functional._PLANS.clear()
    for i in range(3):  # the first call validates and plans, the others run the plan
        out = qkv.attention(q, k, v, causal=causal)
        assert torch.equal(out.isnan(), want), f"call {i}"
    assert len(functional._PLANS) == 1
    assert torch.equal(qkv.attention(q, k, v, causal=causal, backend="torch").isnan(), want)
    # the same plan on clean inputs: finite, as the oracle
    out = qkv.attention(*clean, causal=causal)
    torch.testing.assert_close(out.double(), oracle(*clean, causal=causal)[0],
                               atol=0.02 if dtype in (torch.float16, torch.bfloat16) else 1e-5,
                               rtol=0.02)


@pytest.mark.parametrize("hq,hkv,lq,lk,causal", _NAN_CASES)
@pytest.mark.parametrize("where", ["q", "k_all"])
def test_planned_calls_with_gradients_propagate_nan(hq, hkv, lq, lk, causal, where):
    # The plan is shared by calls with and without autograd (SDPA may pick another kernel).
    q, k, v = _poison(*rand_qkv(1, hq, hkv, lq, lk, 8, dtype=torch.float32, seed=5), where)
    want = oracle(q, k, v, causal=causal)[0].isnan()
    functional._PLANS.clear()
    with torch.inference_mode():
        qkv.attention(q, k, v, causal=causal)  # plans outside autograd
    for t in (q, k, v):
        t.requires_grad_(True)
    out = qkv.attention(q, k, v, causal=causal)
    assert out.requires_grad and torch.equal(out.isnan(), want)


def _sdpa_drops(q, k, v, causal) -> bool:
    """A CPU kernel SDPA may pick (flash, math) gives another NaN pattern than the oracle:
    it leaves a row finite that the oracle makes NaN, or lets a key that causal hides
    reach a row (the math kernel adds the mask to the scores: -inf + NaN is NaN)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    want = oracle(q, k, v, causal=causal)[0].isnan()
    for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(q, kk, vv,
                                                 is_causal=causal and q.shape[2] > 1)
        if not torch.equal(out.isnan(), want):
            return True
    return False


def test_sdpa_drops_nan_where_the_plan_keeps_the_fix_up():
    # The reason for the check, and what the tests above would catch without it: on this
    # PyTorch, SDPA drops NaN for these signatures, and the plan of each keeps the check;
    # it runs SDPA bare only where SDPA propagates NaN by itself.
    be = kernels.get("torch")
    dropped = 0
    for hq, hkv, lq, lk, causal in _NAN_CASES:
        for dtype in _NAN_DTYPES:
            clean = rand_qkv(1, hq, hkv, lq, lk, 16, dtype=dtype, seed=1)
            drops = any(_sdpa_drops(*_poison(*clean, w), causal)
                        for w in ("q", "k_all", "q+inf", "k0+inf", "k_last"))
            run, _ = _plan_of(*clean, causal=causal)
            bare = run is torch.nn.functional.scaled_dot_product_attention or \
                getattr(run, "func", None) is torch.nn.functional.scaled_dot_product_attention
            checked = drops or dtype in (torch.float16, torch.bfloat16)  # half: always
            assert _is_runner(run) and bare is not checked, (hq, hkv, lq, lk, causal, dtype)
            dropped += drops
            call, _ = functional.prepare_call(*clean, causal=causal)
            assert be.plain_runner(call) is not None
    # One key (Lk=1) is shorter than any SIMD vector: if SDPA stopped dropping NaN there,
    # the check would no longer be exercised by these tests; revisit them.
    assert dropped >= len(_NAN_DTYPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_runner_propagates_nan_for_every_key_count(dtype):
    # The decoding step's runner serves a growing cache (Lk = 1, 2, ...): the check is
    # decided per key count.
    be = kernels.get("torch")
    q0, k0, v0 = rand_qkv(1, 4, 2, 1, 1, 16, dtype=dtype, seed=2)
    call, _ = functional.prepare_call(q0, k0, v0)
    run = be.plain_runner(call, any_keys=True)
    for lk in [1, 2, 5, 15, 16, 17, 33, 3, 1]:
        clean = rand_qkv(1, 4, 2, 1, lk, 16, dtype=dtype, seed=lk)
        for where in ("q", "k0", "k_all", "v"):
            q, k, v = _poison(*clean, where)
            want = oracle(q, k, v)[0].isnan()
            assert torch.equal(run(q, k, v).isnan(), want), (lk, where)
        want = qkv.attention(*clean, backend="torch")
        torch.testing.assert_close(run(*clean), want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_runner_with_fixed_keys_checks_them_once(dtype):
    # A cross-attention cache: the same keys on every step, checked when the runner is made.
    # Lk = 5: SDPA's CPU flash kernel drops NaN there, so only the check keeps it.
    be = kernels.get("torch")
    q, k, v = rand_qkv(1, 4, 2, 1, 5, 16, dtype=dtype, seed=4)
    call, _ = functional.prepare_call(q, k, v)
    run = be.plain_runner(call, any_keys=True, fixed_keys=k)
    bad_q, _, _ = _poison(q, k, v, "q")
    assert torch.equal(run(bad_q, k, v).isnan(), oracle(bad_q, k, v)[0].isnan())
    torch.testing.assert_close(run(q, k, v), qkv.attention(q, k, v, backend="torch"),
                               atol=0, rtol=0)
    _, bad_k, _ = _poison(q, k, v, "k0")
    assert torch.equal(run(q, bad_k, v).isnan(), oracle(q, bad_k, v)[0].isnan())  # not k
    # Keys that held NaN when the runner was made are never trusted.
    run = be.plain_runner(call, any_keys=True, fixed_keys=bad_k)
    assert torch.equal(run(q, bad_k, v).isnan(), oracle(q, bad_k, v)[0].isnan())


@pytest.mark.parametrize("where", ["k_last", "q-inf"])
def test_a_key_causal_hides_stays_hidden_under_every_sdpa_kernel(where):
    # SDPA's math kernel adds the causal mask to the scores, so a NaN score (or an +inf one,
    # from a -inf query element against a negative key element) on a hidden key would reach
    # the rows it is hidden from; the flash kernel, the CPU default, does not. A plan must
    # hold under both.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = rand_qkv(1, 2, 2, 20, 20, 16, dtype=torch.float32, seed=3)
    if where == "k_last":
        q, k, v = _poison(q, k, v, where)
    else:  # row 0 sees key 0 alone, at score -inf (weight 0); the hidden keys score +inf
        q[0, 0, 0, 1] = float("-inf")
        k[0, 0, :, 1] = -k[0, 0, :, 1].abs()
        k[0, 0, 0, 1] = 1.0
    want = oracle(q, k, v, causal=True)[0].isnan()
    assert want.any() != (where != "k_last")  # -inf: no row NaN, row 0 sees no key
    for kernel in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        functional._PLANS.clear()
        with sdpa_kernel([kernel]):
            for _ in range(2):  # the call that plans, then the planned one
                assert torch.equal(qkv.attention(q, k, v, causal=True).isnan(), want)


def test_a_plan_made_under_one_sdpa_kernel_keeps_nan_under_another():
    # The plan is made once, in whatever kernel choice the first call ran under; the math
    # kernel propagates NaN where the flash kernel (the default on CPU) drops it.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _poison(*rand_qkv(1, 4, 4, 1, 3, 16, dtype=torch.float32, seed=9), "q")
    want = oracle(q, k, v)[0].isnan()
    functional._PLANS.clear()
    with sdpa_kernel([SDPBackend.MATH]):
        assert torch.equal(qkv.attention(q, k, v).isnan(), want)  # plans
    assert torch.equal(qkv.attention(q, k, v).isnan(), want)  # the planned call, on flash
