"""qkv's per-call costs on a CUDA device, where users call it many times on small shapes.

::

    python benchmarks/gpu_calls.py             # a table; JSON to $OUT/gpu_calls.json if set

Rows (bf16 unless named; each time is a median of ``--rounds`` rounds of ``--calls``
calls, the device synchronised once at each round's end, so launch and host costs show):

* ``first call`` -- seconds of the first ``qkv.attention`` call of a new shape class on the
  Triton backend (compiling and tuning its kernels), then of the second call;
* ``decode`` -- one decoding step's attention, q (1, 8, 1, 64) against k/v (1, 8, L, 64):
  ``qkv.attention`` with ``auto``, ``"torch"`` and ``"triton"`` against SDPA;
* ``mha`` -- ``qkv.MultiHeadAttention(512, 8)`` vs ``nn.MultiheadAttention`` on (4, 64, 512);
* ``train-size`` -- (8, 8, 512, 64) causal forward and backward, each backend vs SDPA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's qkv, even when another is installed


def per_call_us(fn, *, calls: int, rounds: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import qkv

    if not torch.cuda.is_available():
        print("gpu_calls.py: error: no CUDA device", file=sys.stderr)
        return 2
    dev, bf16 = "cuda", torch.bfloat16
    rows = []

    def row(name, qkv_us, torch_us, what="qkv / torch"):
        rows.append(dict(row=name, qkv_us=round(qkv_us, 2), torch_us=round(torch_us, 2),
                         ratio=round(qkv_us / torch_us, 3), what=what))
        print(f"{name:34s} {qkv_us:10.1f} {torch_us:10.1f} {qkv_us / torch_us:7.2f}  {what}",
              flush=True)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'row':34s} {'qkv us':>10s} {'torch us':>10s} {'ratio':>7s}")
    q = torch.randn(2, 8, 1000, 64, device=dev, dtype=bf16)
    t = time.perf_counter()
    qkv.attention(q, q, q, causal=True)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    t = time.perf_counter()
    qkv.attention(q, q, q, causal=True)
    torch.cuda.synchronize()
    row("first call / second call (s->us)", first * 1e6, (time.perf_counter() - t) * 1e6,
        "first / second")

    kw = dict(calls=args.calls, rounds=args.rounds)
    for dtype in (bf16, torch.float32):
        for n in (128, 2048):
            qkv_ = (torch.randn(1, 8, 1, 64, device=dev, dtype=dtype),
                    *(torch.randn(1, 8, n, 64, device=dev, dtype=dtype) for _ in range(2)))
            sdpa = per_call_us(lambda t=qkv_: F.scaled_dot_product_attention(*t), **kw)
            name = f"decode L={n} {str(dtype)[6:]}"
            row(f"{name} auto", per_call_us(lambda t=qkv_: qkv.attention(*t), **kw), sdpa)
            for be in ("torch", "triton"):
                row(f"{name} {be}", per_call_us(
                    lambda t=qkv_, be=be: qkv.attention(*t, backend=be), **kw), sdpa)

    mine = qkv.MultiHeadAttention(512, 8).to(dev).eval()
    ref = torch.nn.MultiheadAttention(512, 8, batch_first=True).to(dev).eval()
    x = torch.randn(4, 64, 512, device=dev)
    with torch.inference_mode():
        row("mha (4, 64, 512) fp32", per_call_us(lambda: mine(x), **kw),
            per_call_us(lambda: ref(x, x, x, need_weights=False), **kw))

    q, k, v = (torch.randn(8, 8, 512, 64, device=dev, dtype=bf16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(8, 8, 512, 64, device=dev, dtype=bf16)

    def step(f):
        return lambda: torch.autograd.grad(f(q, k, v), (q, k, v), g)

    sdpa = per_call_us(step(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True)),
                       **kw)
    for be in ("auto", "torch", "triton"):
        row(f"train-size fwd+bwd (8,8,512,64) {be}",
            per_call_us(step(lambda *t, be=be: qkv.attention(*t, causal=True, backend=be)),
                        **kw), sdpa)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_calls.json"
        path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                        torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
