"""Where per-call costs show: qkv against PyTorch on small calls, a module, decoding, a
training step, and the chunked forward.

::

    python benchmarks/overhead.py                 # every row (a few minutes on 2 cores)
    python benchmarks/overhead.py --quick         # fewer rounds, no L=4096 rows
    python benchmarks/overhead.py --json out.json

One table, one row per case: qkv's median time, PyTorch's (or the other variant's) median
time, and their ratio last. Each row runs its two contenders in interleaved rounds in this
one process (a, b, a, b, ...; a warm-up of each first) and takes the median of each; a
round of a small case times a loop of many calls, so the clock's resolution does not
matter. Ratios, not seconds, are what to compare between runs of a shared machine.

Rows:

* ``attention`` -- ``qkv.attention`` vs ``F.scaled_dot_product_attention`` on q (1,4,1,16),
  k/v (1,4,20,16): one decoding step's attention, all overhead;
* ``mha`` -- ``qkv.MultiHeadAttention(64, 4).eval()`` vs ``nn.MultiheadAttention(64, 4,
  batch_first=True).eval()`` with the same weights, on x (1, 20, 64);
* ``decode`` -- greedy decoding of 64 tokens (batch 1) by ``qkv train``'s default seq2seq
  model with the KV cache vs recomputing the prefix each step; the ratio is cached /
  uncached (0.33 = 3x faster);
* ``train step`` -- one step (forward, backward, AdamW) of ``qkv train``'s default model
  (d_model 64, 4 heads, 2 + 2 layers, ff 256, dropout 0, batch 64 of the ``dates`` task)
  vs ``torch.nn.Transformer`` of the same shape (pre-LayerNorm, GELU, tied embeddings,
  the same padding and causal masks);
* ``chunked`` -- ``qkv.attention(backend="chunked")`` vs SDPA at L=4096, H=8, D=64,
  float32, full and causal, forward and forward + backward.

All but the chunked rows run in inference mode (``torch.inference_mode``) where they do
not train. Threads: ``torch.set_num_threads(--threads)`` (default 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qkv
from qkv.models.seq2seq import Transformer, TransformerConfig
from qkv.positional import sinusoidal
from qkv.tasks import PAD, get_task


def interleaved(fa, fb, *, rounds: int, inner: int) -> tuple[float, float]:
    """Median seconds per call of fa and fb, timed in alternating rounds of ``inner`` calls."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(rounds):
        for f, out in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            out.append((time.perf_counter() - t0) / inner)
    return statistics.median(ta), statistics.median(tb)


def row_attention(args):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 1, 4, 20, 16, generator=g)
    with torch.inference_mode():
        return interleaved(lambda: qkv.attention(q, k, v),
                           lambda: F.scaled_dot_product_attention(q, k, v),
                           rounds=args.rounds, inner=2000 // args.scale_down)


def row_mha(args):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    mha = qkv.MultiHeadAttention.from_torch(ref).eval()
    x = torch.randn(1, 20, 64)
    with torch.inference_mode():
        return interleaved(lambda: mha(x), lambda: ref(x, x, x, need_weights=False),
                           rounds=args.rounds, inner=1000 // args.scale_down)


def _model_and_batch(batch_size: int):
    task = get_task("dates")
    tok = task.tokenizer()
    cfg = TransformerConfig(vocab_size=tok.vocab_size, dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    examples = task.batch(0, 0, batch_size)
    src = tok.batch([s for s, _ in examples])  # (B, Ls)
    tgt_in = tok.batch([t for _, t in examples], bos=True)  # (B, Lt)
    tgt_out = tok.batch([t for _, t in examples], eos=True)  # (B, Lt)
    return model, cfg, src, tgt_in, tgt_out


def row_decode(args):
    model, _, src, _, _ = _model_and_batch(1)
    model.eval()
    n = 64

    def run(use_cache):
        return lambda: model.greedy(src, max_len=n, use_cache=use_cache, stop_at_eos=False)

    with torch.inference_mode():
        return interleaved(run(True), run(False), rounds=max(3, args.rounds), inner=1)


class TorchSeq2Seq(nn.Module):
    """nn.Transformer with qkv's seq2seq shape: pre-LN, GELU, sinusoidal positions, tied
    embeddings, key padding hidden, causal decoder."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        with warnings.catch_warnings():  # norm_first turns nested tensors off: said once
            warnings.simplefilter("ignore")
            self.net = nn.Transformer(
                cfg.d_model, cfg.num_heads, cfg.encoder_layers, cfg.decoder_layers,
                cfg.ff_dim, cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.register_buffer("pe", sinusoidal(256, cfg.d_model))

    def forward(self, src, tgt_in):
        e = math.sqrt(self.cfg.d_model)
        xs = self.embed(src) * e + self.pe[: src.shape[1]]  # (B, Ls, E)
        xt = self.embed(tgt_in) * e + self.pe[: tgt_in.shape[1]]  # (B, Lt, E)
        pad = src == self.cfg.pad_id  # (B, Ls) True = hidden
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1])
        y = self.net(xs, xt, tgt_mask=causal, src_key_padding_mask=pad,
                     memory_key_padding_mask=pad, tgt_is_causal=True)  # (B, Lt, E)
        return y @ self.embed.weight.T  # (B, Lt, V)


def row_train(args):
    model, cfg, src, tgt_in, tgt_out = _model_and_batch(64)
    ref = TorchSeq2Seq(cfg)
    model.train(), ref.train()

    def step(net, opt):
        def f():
            logits = net(src, tgt_in)  # (B, Lt, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                                   ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return f

    fa = step(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    fb = step(ref, torch.optim.AdamW(ref.parameters(), lr=1e-4))
    return interleaved(fa, fb, rounds=args.rounds, inner=max(1, 4 // args.scale_down))


def row_chunked(args, *, causal: bool, backward: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 8, 4096, 64, generator=g)
    if backward:
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))

    def run(f):
        def go():
            out = f()
            if backward:
                out.sum().backward()
        return go

    fa = run(lambda: qkv.attention(q, k, v, causal=causal, backend="chunked"))
    fb = run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    if backward:
        return interleaved(fa, fb, rounds=max(3, args.rounds // 4), inner=1)
    with torch.inference_mode():
        return interleaved(fa, fb, rounds=max(3, args.rounds // 4), inner=1)


def rows(args):
    """(name, qkv label, baseline label, function, target ratio)."""
    out = [
        ("attention q(1,4,1,16) k/v(1,4,20,16)", "qkv.attention", "SDPA", row_attention, 1.5),
        ("MultiHeadAttention(64,4) x(1,20,64)", "qkv", "nn.MultiheadAttention", row_mha, 1.05),
        ("greedy decode 64 tokens, batch 1", "KV cache", "no cache", row_decode, 1 / 3),
        ("train step seq2seq (dates, batch 64)", "qkv", "nn.Transformer", row_train, 1.0),
    ]
    if not args.quick:
        for bwd in (False, True):
            for causal in (False, True):
                name = (f"chunked L=4096 H=8 D=64 {'causal' if causal else 'full'} "
                        f"{'fwd+bwd' if bwd else 'fwd'}")
                target = None if bwd else 1.3

                def f(a, causal=causal, bwd=bwd):
                    return row_chunked(a, causal=causal, backward=bwd)
                out.append((name, "chunked", "SDPA", f, target))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, no chunked rows")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per row")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="run only rows whose name contains this")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    args.scale_down = 4 if args.quick else 1
    if args.quick:
        args.rounds = min(args.rounds, 7)
    torch.set_num_threads(args.threads)

    results = []
    print(f"{'case':<42} {'qkv':>16} {'baseline':>24} {'ratio':>7} {'target':>8}")
    for name, la, lb, fn, target in rows(args):
        if args.only and args.only not in name:
            continue
        ta, tb = fn(args)
        ratio = ta / tb
        ok = "" if target is None else ("ok" if ratio <= target else "MISS")
        tgt = "" if target is None else f"<={target:.2f}"
        print(f"{name:<42} {la:>8} {_fmt(ta):>7} {lb:>15} {_fmt(tb):>8} {ratio:>7.2f} "
              f"{tgt:>6} {ok}", flush=True)
        results.append({"case": name, "qkv_label": la, "baseline_label": lb, "qkv_s": ta,
                        "baseline_s": tb, "ratio": ratio, "target": target})
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
            "machine": platform.machine(), "cpus": os.cpu_count(), "rows": results,
        }, indent=2))


def _fmt(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f}us"
    if s < 1:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.3f}s"


if __name__ == "__main__":
    main()
