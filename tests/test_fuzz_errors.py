"""Seeded fuzz of INVALID calls: qkv.attention, qkv.explain, MultiHeadAttention, KVCache
and the mask builders refuse every bad input with a ValueError or TypeError whose message
names the argument and says how to fix it.

Each case builds a valid call from random sizes, checks that it runs, then breaks exactly
one thing and checks the refusal. The default number of cases suits CI (a few seconds); a
longer run is one command::

    QKV_FUZZ_CASES=20000 pytest tests/test_fuzz_errors.py

``QKV_FUZZ_SEED`` changes the seed (default 0); a failure names the case's seed.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import qkv

CASES = int(os.environ.get("QKV_FUZZ_CASES", "400"))
SEED = int(os.environ.get("QKV_FUZZ_SEED", "0"))
CHUNK = 100  # cases per test item, so a failure points at a small range


# ---- qkv.attention / qkv.explain -----------------------------------------------------------
def _qkv(rng: random.Random):
    b, hkv, g = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 2)
    lq, lk, d, dv = rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6)
    lead = [(), (b,), (b, 2)][rng.randint(0, 2)]
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    dt = rng.choice([torch.float32, torch.float64])
    q = torch.randn(*lead, hkv * g, lq, d, generator=gen, dtype=dt)
    k = torch.randn(*lead, hkv, lk, d, generator=gen, dtype=dt)
    v = torch.randn(*lead, hkv, lk, dv, generator=gen, dtype=dt)
    return {"q": q, "k": k, "v": v}


def _not_a_tensor(rng, t):
    return rng.choice([t.tolist(), t.numpy(), None, 3, "q"])


def _break_attention(rng: random.Random, args: dict, kw: dict) -> tuple[str, ...]:
    """Break one thing of ``args``/``kw`` in place; return the words one of which the
    message must contain (the argument's name)."""
    q, k, v = args["q"], args["k"], args["v"]
    kind = rng.randrange(24)
    name = rng.choice("qkv")
    t = args[name]
    if kind == 0:
        args[name] = _not_a_tensor(rng, t)
        return (name,)
    if kind == 1:
        args[name] = t.to(rng.choice([torch.int64, torch.int32, torch.bool, torch.uint8]))
        return (name,)
    if kind == 2:
        args[name] = t.reshape(-1) if rng.random() < 0.5 else t.reshape(-1, t.shape[-1])
        return (name,)
    if kind == 3:
        other = torch.float16 if t.dtype != torch.float16 else torch.float32
        args[name] = t.to(other)
        return ("dtype",)
    if kind == 4:  # head dim of k differs from q's
        args["k"] = torch.randn(*k.shape[:-1], k.shape[-1] + rng.randint(1, 3), dtype=k.dtype)
        return ("head dim",)
    if kind == 5:  # v's length or heads differ from k's
        shape = list(v.shape)
        shape[-2 if rng.random() < 0.5 else -3] += rng.randint(1, 2)
        args["v"] = torch.randn(*shape, dtype=v.dtype)
        return ("v ",)
    if kind == 6:  # query heads not a multiple of key heads, or none
        hkv = k.shape[-3]
        hq = 0 if hkv == 1 or rng.random() < 0.3 else hkv + 1
        args["q"] = torch.randn(*q.shape[:-3], hq, *q.shape[-2:], dtype=q.dtype)
        return ("heads",)
    if kind == 7:  # one more leading dim, or another batch size
        if t.dim() == 3 or rng.random() < 0.5:
            args[name] = t[None]
            return ("dims",)
        args[name] = torch.cat([t, t], dim=0)
        return ("leading",)
    if kind == 8:
        kw["mask"] = rng.choice([[[True]], 1.0, np.ones((2, 2), dtype=bool), "causal"])
        return ("mask",)
    if kind == 9:
        kw["mask"] = torch.ones(q.shape[-2], k.shape[-2],
                                dtype=rng.choice([torch.int64, torch.uint8, torch.int8]))
        return ("mask",)
    if kind == 10:  # a shape that does not broadcast
        kw["mask"] = torch.ones(q.shape[-2] + 1, k.shape[-2] + rng.randint(0, 1),
                                dtype=torch.bool)
        return ("mask",)
    if kind == 11:
        kw["mask"] = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device="meta")
        return ("mask",)
    if kind == 12:
        kw["causal"] = rng.choice([1, 0, "yes", None, np.bool_(True), 1.0])
        return ("causal",)
    if kind == 13:
        kw["window"] = rng.choice([-1, (1, -2), (-3, None), 1.5, (1, 2, 3), True, "2", (1.0, 1),
                                   (None, False), [2]])
        return ("window",)
    if kind == 14:
        kw["scale"] = rng.choice([float("nan"), float("inf"), -float("inf"), True, "0.5", 1j,
                                  np.float32("nan"), [0.5], torch.tensor(0.5)])
        return ("scale",)
    if kind == 15:
        kw["dropout"] = rng.choice([-0.1, 1.0, 1.5, float("nan"), True, "0.1", np.float64(2.0),
                                    None, float("inf")])
        return ("dropout",)
    if kind == 16:
        kw["return_weights"] = rng.choice([1, "no", None, np.bool_(False)])
        return ("return_weights",)
    if kind == 17:
        kw["backend"] = rng.choice(["cuda-magic", "", "Torch", 3, None, ["torch"]])
        return ("backend",)
    if kind == 18:
        kw["backend"], kw["return_weights"] = "torch", True
        return ("backend",)
    if kind == 19:
        kw["generator"] = rng.choice([3, "seed", np.random.default_rng(0)])
        kw["dropout"] = 0.1
        return ("generator",)
    if kind == 20:  # head dim 0
        args["q"] = q[..., :0]
        args["k"] = k[..., :0]
        return ("head dim",)
    if kind == 21:  # mask on another device kind than q (meta q)
        args.update({n: args[n].to("meta") for n in "qkv"})
        kw["mask"] = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
        return ("mask", "meta")
    if kind == 22:
        kw["window"] = rng.choice([(1,), (), {"left": 1}, object()])
        return ("window",)
    kw["mask"] = torch.ones(2, 3, 4, 5, 6, 7, dtype=torch.bool)  # too many dims
    return ("mask",)


# ---- MultiHeadAttention and KVCache --------------------------------------------------------
def _break_module(rng: random.Random):
    """(a callable that must raise, words one of which the message must contain)."""
    e, h = rng.choice([(8, 2), (12, 3), (6, 6), (16, 4)])
    kind = rng.randrange(12)
    if kind == 0:
        arg = rng.choice(["embed_dim", "num_heads", "num_kv_heads", "kdim", "vdim"])
        bad = rng.choice([0, -1, 2.5, True, "8", None if arg in ("embed_dim", "num_heads")
                          else -4])
        return (lambda: qkv.MultiHeadAttention(**{"embed_dim": e, "num_heads": h, arg: bad}),
                (arg,))
    if kind == 1:
        return lambda: qkv.MultiHeadAttention(e + 1, h) if (e + 1) % h else \
            qkv.MultiHeadAttention(e + 2, h), ("embed_dim", "num_heads")
    if kind == 2:
        bad = rng.choice([-0.5, 1.0, float("nan"), "0.1", True])
        return lambda: qkv.MultiHeadAttention(e, h, dropout=bad), ("dropout",)
    m = qkv.MultiHeadAttention(e, h)
    x = torch.randn(rng.randint(1, 2), rng.randint(1, 5), e)
    if kind == 3:
        bad = rng.choice([x[0], x[..., :-1], x.tolist(), x.numpy(), x[None], None])
        return lambda: m(bad), ("x",)
    if kind == 4:
        return lambda: m(x.double()), ("x",)
    if kind == 5:
        bad = rng.choice([x[..., :-1], torch.randn(x.shape[0] + 1, 3, e), x.tolist(), x[0]])
        return lambda: m(x, bad), ("context",)
    if kind == 6:
        return lambda: m(x, cache=rng.choice([{}, [], "cache"])), ("cache",)
    if kind == 7:
        return lambda: m(x, need_weights=rng.choice([1, "yes", None])), ("need_weights",)
    if kind == 8:
        return lambda: m(x, mask=torch.ones(7, 9, dtype=torch.bool)), ("mask",)
    if kind == 9:
        return lambda: m(x, window=-1), ("window",)
    cache = qkv.KVCache()
    kk = torch.randn(2, 1, 3, 4)
    cache.append(kk, kk)
    if kind == 10:
        bad = rng.choice([[0], torch.tensor([0.0]), torch.tensor([[0]]), torch.tensor([2]),
                          torch.tensor([-3]), None])
        return lambda: cache.reorder(bad), ("reorder", "rows")
    bad = rng.choice([(kk.tolist(), kk), (kk, kk[..., :2, :]), (kk.double(), kk.double()),
                      (kk[:1], kk[:1]), (kk[0], kk[0])])
    return lambda: cache.append(*bad), ("KVCache",)


def _break_builder(rng: random.Random):
    kind = rng.randrange(5)
    bad = rng.choice([-1, 2.5, True, "3", None, -100])
    if kind == 0:
        return lambda: qkv.causal_mask(bad), ("lq",)
    if kind == 1:
        return lambda: qkv.causal_mask(3, bad if bad is not None else -2), ("lk",)
    if kind == 2:
        w = rng.choice([-2, (1, -1), (0.5, 1), "1", True, (1, 2, 3)])
        return lambda: qkv.window_mask(4, 5, w), ("window",)
    if kind == 3:
        t = rng.choice([[1, 2], torch.tensor([1.0, 2.0]), torch.tensor([-1, 2]),
                        torch.ones(2, 2, 2, dtype=torch.bool), torch.tensor([[1, 2]])])
        return lambda: qkv.padding_mask(t), ("lengths", "padding mask", "padding_mask")
    return lambda: qkv.padding_mask(torch.tensor([3, 1]), rng.choice([2, -1, 1.5])), \
        ("max_len",)


def _problem(call, names) -> str | None:
    """None when ``call`` raises a ValueError/TypeError naming one of ``names`` with a fix;
    otherwise what went wrong."""
    try:
        call()
    except Exception as e:  # every exception is judged here, not only the expected two
        msg = str(e)
        if type(e) not in (ValueError, TypeError):
            return f"{type(e).__name__}: {msg}"
        if not any(n in msg for n in names):
            return f"the message names none of {names}: {msg}"
        if "Fix" not in msg:
            return f"the message gives no fix: {msg}"
        return None
    return "accepted"


@pytest.mark.parametrize("start", range(0, CASES, CHUNK))
def test_invalid_calls_are_refused_clearly(start):
    problems = []
    for i in range(start, min(start + CHUNK, CASES)):
        seed = SEED * 1_000_003 + i
        rng = random.Random(seed)
        target = rng.random()
        if target < 0.6:
            args, kw = _qkv(rng), {}
            fn = qkv.explain if rng.random() < 0.15 else qkv.attention
            fn(**args)  # the valid call runs
            names = _break_attention(rng, args, kw)
            if fn is qkv.explain and ("backend" in kw or "return_weights" in kw):
                fn = qkv.attention  # explain has neither option
            call = lambda fn=fn, args=args, kw=kw: fn(**args, **kw)  # noqa: E731
        elif target < 0.85:
            call, names = _break_module(rng)
        else:
            call, names = _break_builder(rng)
        why = _problem(call, names)
        if why is not None:
            problems.append(f"case seed {seed}: {why}")
    assert not problems, f"{len(problems)} bad refusals:\n" + "\n".join(problems)
