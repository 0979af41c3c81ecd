"""The seq2seq Transformer: positions, masks, exact incremental decoding, beam search, and
that training makes it learn (overfitting a batch; the alignments of reverse and copy)."""

from __future__ import annotations

import copy
import itertools
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from qkv.attention_map import AttentionMap
from qkv.decode import load_run
from qkv.models.decode_step import LeanStep
from qkv.models.seq2seq import (
    DecoderLayer,
    DecodeState,
    FeedForward,
    Transformer,
    TransformerConfig,
)
from qkv.positional import RotaryEmbedding, sinusoidal
from qkv.tasks import get_task
from qkv.train import TrainConfig, train

TINY = {"d_model": 32, "num_heads": 2, "encoder_layers": 2, "decoder_layers": 2, "ff_dim": 64}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads stall on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(vocab: int = 11, **kw) -> Transformer:
    torch.manual_seed(kw.pop("seed", 0))
    return Transformer(TransformerConfig(vocab_size=vocab, **{**TINY, "dropout": 0.0, **kw}))


def briefly_trained(positions: str) -> Transformer:
    """A tiny model after 60 steps of ``reverse`` over 10 letters (vocabulary 13).

    An untrained model with tied embeddings keeps predicting its last input token; a
    little training makes it decode varied sequences, which the decoding tests need."""
    task = get_task("reverse", alphabet="abcdefghij", min_len=5, max_len=12)
    tok = task.tokenizer()
    m = tiny(vocab=tok.vocab_size, positions=positions)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for step in range(60):
        batch = task.batch(0, step, 32)
        logits = m(tok.batch([s for s, _ in batch]), tok.batch([t for _, t in batch], bos=True))
        loss = F.cross_entropy(logits.reshape(-1, tok.vocab_size),
                               tok.batch([t for _, t in batch], eos=True).reshape(-1),
                               ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module", params=["sinusoidal", "rotary"])
def trained(request) -> Transformer:
    return briefly_trained(request.param)


def random_src(vocab: int, lengths: list[int], seed: int = 1) -> torch.Tensor:
    """Right-padded source ids (B, max(lengths)) with real tokens >= 3."""
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, vocab, (n,), generator=g)
    return src


# ---- positions ---------------------------------------------------------------------------
def test_sinusoidal_table():
    t = sinusoidal(50, 8, dtype=torch.float64)  # (L, D)
    assert t.shape == (50, 8)
    assert torch.equal(t[0, 0::2], torch.zeros(4)) and torch.equal(t[0, 1::2], torch.ones(4))
    for i in range(4):  # dimension 2i at position p: sin(p / 10000^(2i/8))
        assert t[7, 2 * i].item() == pytest.approx(math.sin(7 / 10000 ** (2 * i / 8)), abs=1e-15)
        assert t[7, 2 * i + 1].item() == pytest.approx(math.cos(7 / 10000 ** (2 * i / 8)),
                                                       abs=1e-15)
    assert torch.equal(sinusoidal(5, 8, offset=13), sinusoidal(18, 8)[13:])
    with pytest.raises(ValueError, match="even"):
        sinusoidal(3, 7)


def test_rotary_is_a_rotation_that_sees_relative_positions():
    rot = RotaryEmbedding(8)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64)  # (B, H, L, Dh)
    k = torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64)
    rq, rk = rot(q, 0), rot(k, 0)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-14, atol=0)
    torch.testing.assert_close(rq[:, :, 0], q[:, :, 0], rtol=0, atol=0)  # position 0: identity
    # <R(q, m), R(k, n)> depends on m - n only: shifting both positions changes nothing
    torch.testing.assert_close(rot(q, 11) @ rot(k, 11).transpose(-1, -2),
                               rq @ rk.transpose(-1, -2), rtol=1e-12, atol=1e-12)
    # an offset continues the positions of a longer sequence (the KV-cache contract)
    torch.testing.assert_close(rot(q[:, :, 4:], 4), rq[:, :, 4:], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"\(B, H, L, 8\)"):
        rot(torch.zeros(2, 6, 8))


# ---- the model ---------------------------------------------------------------------------
def test_padding_is_invisible():
    """Extra padding after a source changes nothing for the real tokens (padding keys are
    hidden by qkv.padding_mask in encoder self-attention and in cross-attention)."""
    m = tiny().eval()
    src = random_src(11, [5, 3])
    padded = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], dim=1)  # (B, 9)
    tgt = torch.tensor([[1, 5, 6, 7], [1, 4, 4, 8]])
    mem_a, _ = m.encode(src)
    mem_b, _ = m.encode(padded)
    torch.testing.assert_close(mem_b[0, :5], mem_a[0, :5])
    torch.testing.assert_close(mem_b[1, :3], mem_a[1, :3])
    torch.testing.assert_close(m(padded, tgt), m(src, tgt))


def test_decoder_is_causal():
    m = tiny().eval()
    src = random_src(11, [6, 6])
    a = torch.tensor([[1, 5, 6, 7, 8], [1, 3, 4, 9, 10]])
    b = a.clone()
    b[:, 3:] = torch.tensor([[9, 9], [5, 3]])
    la, lb = m(src, a), m(src, b)  # (B, Lt, V)
    torch.testing.assert_close(la[:, :3], lb[:, :3])
    assert not torch.allclose(la[:, 3:], lb[:, 3:])


def _step_logits(m: Transformer, src: torch.Tensor, tokens: torch.Tensor, cache: bool):
    """Logits of every step when feeding ``tokens`` one at a time (cache) or as prefixes."""
    mem, mask = m.encode(src)
    state = DecodeState(mem, mask, m.config.decoder_layers) if cache else None
    return torch.stack([m._step_logits(tokens[:, : t + 1], mem, mask, state)
                        for t in range(tokens.shape[1])], dim=1)  # (B, T, V)


def test_kv_cache_decoding_equals_full_recomputation(trained):
    m = trained
    src = random_src(13, [7, 4, 9])
    cached = m.greedy(src, max_len=24, stop_at_eos=False)  # (B, 24)
    full = m.greedy(src, max_len=24, stop_at_eos=False, use_cache=False)
    assert torch.equal(cached, full)
    assert len(set(cached.flatten().tolist())) > 3  # a real sequence, not one token repeated
    assert torch.equal(m.greedy(src, max_len=24), m.greedy(src, max_len=24, use_cache=False))
    # The logits agree as closely as float32 allows: the cache's error against a float64
    # model is at most 2x (+1e-5) the error of full recomputation in float32 (DESIGN rule).
    tokens = torch.cat([torch.ones(3, 1, dtype=torch.long), cached[:, :-1]], dim=1)
    with torch.no_grad():
        l_cache = _step_logits(m, src, tokens, cache=True)
        l_full = _step_logits(m, src, tokens, cache=False)
        l_64 = _step_logits(copy.deepcopy(m).double(), src, tokens, cache=False)
    err_full = (l_full.double() - l_64).abs().max().item()
    err_cache = (l_cache.double() - l_64).abs().max().item()
    assert err_cache <= 2 * err_full + 1e-5


def test_beam_one_is_greedy_and_beam_scores_are_log_probabilities(trained):
    m = trained
    src = random_src(13, [5, 8, 2, 6], seed=3)
    greedy = m.greedy(src, max_len=12)
    beam1, _ = m.beam_search(src, beam=1, max_len=12)
    assert torch.equal(beam1, greedy)
    for use_cache in (True, False):
        best, score = m.beam_search(src, beam=3, max_len=12, use_cache=use_cache)
        # the score is the log-probability of the returned sequence (up to its EOS)
        tgt_in = torch.cat([torch.ones(4, 1, dtype=torch.long), best[:, :-1]], dim=1)
        with torch.no_grad():
            logp = torch.log_softmax(m(src, tgt_in), dim=-1)  # (B, T, V)
        tok_lp = logp.gather(-1, best[:, :, None])[..., 0]  # (B, T)
        real = torch.cat([torch.ones(4, 1, dtype=torch.bool), best[:, :-1] != 2], dim=1) \
            & (best != 0)
        torch.testing.assert_close((tok_lp * real).sum(-1), score, rtol=1e-5, atol=1e-5)


def test_full_beam_finds_the_most_likely_sequence(trained):
    """With beam = vocabulary size and two steps, beam search is exhaustive."""
    v = 13
    m = trained
    src = random_src(v, [4])
    best, score = m.beam_search(src, beam=v, max_len=2)
    mem, mask = m.encode(src)
    scores = {}
    with torch.no_grad():
        for a, b in itertools.product(range(v), repeat=2):
            lp = torch.log_softmax(m.decode(torch.tensor([[1, a]]), mem, mask)[0][0], -1)
            if a == 2:  # EOS first: the sequence is finished, PAD follows at no cost
                scores[(a, 0)] = lp[0, a].item()
            else:
                scores[(a, b)] = lp[0, a].item() + lp[1, b].item()
    want = max(scores, key=scores.get)
    assert tuple(best[0].tolist()) == want
    assert score.item() == pytest.approx(scores[want], abs=1e-5)


def test_cross_attention_map():
    m = tiny().eval()
    src = random_src(11, [5])
    out = m.greedy(src, max_len=6, stop_at_eos=False)
    w = m.cross_attention(src, out)  # (layers, B, H, T, Ls)
    assert w.shape == (2, 1, 2, 6, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 1, 2, 6))
    amap = m.cross_attention_map(src, out, source_tokens=list("abcde"),
                                 output_tokens=list("uvwxyz"), title="t")
    assert isinstance(amap, AttentionMap) and amap.weights.shape == (2, 2, 6, 5)
    assert amap.key_tokens == list("abcde") and amap.tokens == list("uvwxyz")


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible"):
        TransformerConfig(vocab_size=10, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="positions"):
        TransformerConfig(vocab_size=10, positions="learned")
    with pytest.raises(ValueError, match="unknown model config keys"):
        TransformerConfig.from_dict({"vocab_size": 10, "colour": 1})
    m = tiny()
    with pytest.raises(ValueError, match=r"outside 0\.\.10"):
        m(torch.tensor([[3, 11]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="beam"):
        m.beam_search(torch.tensor([[3]]), beam=0, max_len=3)


# ---- it learns ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dates", "reverse", "sort", "copy"])
def test_overfits_a_fixed_batch(name):
    """A tiny model drives the loss on one fixed batch below 0.05 nats per token."""
    task = get_task(name) if name == "dates" else get_task(name, min_len=3, max_len=8)
    tok = task.tokenizer()
    batch = task.batch(0, 0, 16)
    src = tok.batch([s for s, _ in batch])
    tgt_in = tok.batch([t for _, t in batch], bos=True)
    tgt_out = tok.batch([t for _, t in batch], eos=True)
    m = tiny(vocab=tok.vocab_size, encoder_layers=1, decoder_layers=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        logits = m(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, tok.vocab_size), tgt_out.reshape(-1),
                               ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.0 and min(losses[-5:]) < 0.05, (losses[0], losses[-5:])


def _alignment_hits(name: str, tmp_path) -> float:
    opts = {"min_len": 4, "max_len": 8}
    steps = 600 if name == "reverse" else 300  # reverse must also learn each length
    shape = TransformerConfig(vocab_size=None, d_model=32, num_heads=2, encoder_layers=1,
                              decoder_layers=1, ff_dim=64, dropout=0.0)
    cfg = TrainConfig(task=name, task_options=opts, steps=steps, batch_size=64, lr=5e-3,
                      warmup=30, model=shape, eval_every=steps, eval_size=100,
                      checkpoint_every=steps)
    train(cfg, tmp_path / name, progress=False)
    run = load_run(tmp_path / name)
    val = get_task(name, **opts).validation(200)
    src = run.tokenizer.batch([s for s, _ in val])
    tgt = run.tokenizer.batch([t for _, t in val])
    w = run.model.cross_attention(src, tgt)[-1].mean(1)  # (B, T, Ls) mean over heads
    hits = total = 0
    for i, (s, _) in enumerate(val):
        n = len(s)
        want = torch.arange(n - 1, -1, -1) if name == "reverse" else torch.arange(n)
        hits += int((w[i, :n, :n].argmax(-1) == want).sum())
        total += n
    return hits / total


@pytest.mark.parametrize("name", ["reverse", "copy"])
def test_learned_alignment(name, tmp_path):
    """After a short run, output t attends most to input L-1-t (reverse) or t (copy)."""
    assert _alignment_hits(name, tmp_path) >= 0.9


@pytest.mark.parametrize("alpha", [0.6, 2.0])
def test_full_beam_with_length_penalty_finds_the_best_normalised_sequence(trained, alpha):
    """Exhaustive as above, ranked by log p / ((5 + n) / 6) ** alpha (n tokens, EOS in)."""
    v = 13
    m = trained
    src = random_src(v, [4])
    best, score = m.beam_search(src, beam=v, max_len=2, length_penalty=alpha)
    mem, mask = m.encode(src)
    raw, norm = {}, {}
    with torch.no_grad():
        for a, b in itertools.product(range(v), repeat=2):
            lp = torch.log_softmax(m.decode(torch.tensor([[1, a]]), mem, mask)[0][0], -1)
            key, n = ((a, 0), 1) if a == 2 else ((a, b), 2)
            raw[key] = lp[0, a].item() + (0.0 if a == 2 else lp[1, b].item())
            norm[key] = raw[key] / ((5 + n) / 6) ** alpha
    want = max(norm, key=norm.get)
    assert tuple(best[0].tolist()) == want
    assert score.item() == pytest.approx(raw[want], abs=1e-5)
    plain, _ = m.beam_search(src, beam=3, max_len=12, length_penalty=0.0)
    assert torch.equal(plain, m.beam_search(src, beam=3, max_len=12)[0])
    with pytest.raises(ValueError, match="length_penalty"):
        m.beam_search(src, beam=2, max_len=3, length_penalty=-1)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_beam_search_without_repeated_ngrams(trained, n):
    m = trained
    src = random_src(13, [5, 8, 2, 6], seed=4)
    best, _ = m.beam_search(src, beam=3, max_len=12, no_repeat_ngram=n)
    for row in best.tolist():
        toks = [t for t in row if t not in (0, 2)]
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        assert len(grams) == len(set(grams)), (n, toks)
    assert torch.equal(m.beam_search(src, beam=3, max_len=12, no_repeat_ngram=0)[0],
                       m.beam_search(src, beam=3, max_len=12)[0])
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        m.beam_search(src, beam=3, max_len=12, no_repeat_ngram=-1)


# ---- the lean cached step ------------------------------------------------------------------
def _lean_and_module_logits(m: Transformer, src: torch.Tensor, steps: int):
    """Logits of ``steps`` cached steps fed the same tokens, computed by LeanStep and by the
    modules (two caches), and whether a LeanStep could be built."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        mem, mask = m.encode(src)
        states = [DecodeState(mem, mask, m.config.decoder_layers) for _ in range(2)]
        ids = torch.full((src.shape[0], 1), m.config.bos_id, dtype=torch.long)
        for s in states:  # the first step fills the caches through the modules
            m._step_logits(ids, mem, mask, s)
        lean = LeanStep.build(m, states[0], steps, stock=(Transformer, DecoderLayer,
                                                          FeedForward))
        if lean is None:
            return None, None
        got, want = [], []
        for _ in range(steps):
            ids = torch.randint(3, m.config.vocab_size, (src.shape[0], 1), generator=gen)
            got.append(lean(ids))
            want.append(m._step_logits(ids, mem, mask, states[1]))
        assert states[0].length == states[1].length == steps + 1
    return torch.stack(got, 1), torch.stack(want, 1)  # (B, steps, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths", [[6], [5, 5], [7, 3, 6]])  # no padding (mask None); padding
def test_lean_step_is_the_module_step_bitwise(dtype, lengths):
    m = tiny(13).to(dtype).eval()
    src = random_src(13, lengths)
    got, want = _lean_and_module_logits(m, src, 40)  # 40 steps: the caches grow past 16
    assert got is not None
    assert got.dtype == dtype and got.shape == (len(lengths), 40, 13)
    assert torch.equal(got, want)


def test_lean_step_is_refused_where_the_modules_would_differ():
    src = random_src(13, [6, 4])
    assert _lean_and_module_logits(tiny(13, dropout=0.1).train(), src, 2)[0] is None
    assert _lean_and_module_logits(tiny(13, positions="rotary").eval(), src, 2)[0] is None
    m = tiny(13).eval()
    handle = m.decoder[1].ff.fc2.register_forward_hook(lambda *a: None)
    assert _lean_and_module_logits(m, src, 2)[0] is None
    handle.remove()
    assert _lean_and_module_logits(m, src, 2)[0] is not None


def test_greedy_with_a_hook_sees_every_step_and_same_tokens():
    m = tiny(13).eval()
    src = random_src(13, [6, 4])
    plain = m.greedy(src, max_len=9, stop_at_eos=False)
    seen = []
    handle = m.decoder[0].cross_attn.register_forward_hook(lambda mod, a, out: seen.append(1))
    try:
        hooked = m.greedy(src, max_len=9, stop_at_eos=False)
    finally:
        handle.remove()
    assert len(seen) == 9
    assert torch.equal(plain, hooked)
    assert torch.equal(plain, m.greedy(src, max_len=9, stop_at_eos=False, use_cache=False))


def test_greedy_takes_the_lean_step_unless_attention_is_watched(monkeypatch, caplog):
    m = tiny(13).eval()
    src = random_src(13, [6, 4])
    calls = []
    step = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, ids: calls.append(1) or step(self, ids))
    plain = m.greedy(src, max_len=9, stop_at_eos=False)
    assert len(calls) == 8  # every step after the first
    calls.clear()
    with caplog.at_level(logging.DEBUG, logger="qkv"):  # every attention call is logged
        logged = m.greedy(src, max_len=9, stop_at_eos=False)
    assert calls == []
    decoder_calls = sum("auto chose" in r.getMessage() for r in caplog.records) - 2  # encoder
    assert decoder_calls == 9 * 2 * 2  # steps x layers x (self, cross)
    assert torch.equal(plain, logged)


def test_beam_search_takes_the_lean_step_and_finds_what_the_modules_find(trained, monkeypatch,
                                                                           caplog):
    """Beam search reorders its caches in place, so the lean step's views stay valid; the
    beams, their scores and the caches' contents equal the module path's (bypassed by the
    DEBUG log, which must see every attention call)."""
    m = trained
    src = random_src(13, [5, 8, 2, 6], seed=7)
    calls = []
    step = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, ids: calls.append(1) or step(self, ids))
    best, score = m.beam_search(src, beam=3, max_len=12, no_repeat_ngram=2)
    if m.config.positions == "sinusoidal":  # every step after the first, until all finish
        assert len(calls) >= 3
    else:  # the lean step spells out sinusoidal positions only
        assert calls == []
    calls.clear()
    with caplog.at_level(logging.DEBUG, logger="qkv"):
        best_m, score_m = m.beam_search(src, beam=3, max_len=12, no_repeat_ngram=2)
    assert calls == []
    assert torch.equal(best, best_m)
    assert torch.equal(score, score_m)
    unc, unc_score = m.beam_search(src, beam=3, max_len=12, no_repeat_ngram=2, use_cache=False)
    assert torch.equal(best, unc)
    torch.testing.assert_close(score, unc_score, rtol=1e-5, atol=1e-5)


def test_decode_state_reorder_keeps_storage_and_matches_kv_cache_reorder():
    m = tiny(13).eval()
    src = random_src(13, [6, 4, 5])
    with torch.no_grad():
        mem, mask = m.encode(src)
        a, b = (DecodeState(mem, mask, m.config.decoder_layers) for _ in range(2))
        ids = torch.tensor([[1], [1], [1]])
        for _ in range(3):
            for s in (a, b):
                m._step_logits(ids, mem, mask, s)
            ids = ids + 3
    storage = [c._k for c in a.self_caches]
    rows = torch.tensor([2, 0, 0])
    a.reorder(rows)
    for c in b.self_caches:
        c.reorder(rows)  # the public, copying reorder
    assert all(c._k is s for c, s in zip(a.self_caches, storage, strict=True))
    for ca, cb in zip(a.self_caches, b.self_caches, strict=True):
        assert torch.equal(ca.k, cb.k) and torch.equal(ca.v, cb.v)
    a.reorder(torch.tensor([1, 2]))  # a new batch size: the copying path
    assert a.self_caches[0].k.shape[0] == 2
