"""Time qkv's Triton kernels at many launch configs, beyond the tuner's short lists.

::

    python benchmarks/gpu_sweep.py --budget 90      # JSON to $OUT/gpu_sweep.json if set

For each head dim D and causal flag at L = ``--length`` (bf16, B * L = 16k tokens,
H * D = 2048, FlashAttention's grid), every config below is forced on the kernels with
``autotune.override`` and timed: the forward alone, then the backward alone (the forward's
output saved once), and last the deterministic backward (dQ in its own pass) at the
tuner's own configs. A config that does not fit the device (shared memory, registers) is
reported, not fatal. What to read: the fastest forward and backward config per (D, causal),
against the first entry of ``autotune.candidates`` (what the tuner would try first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's qkv, even when another is installed
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu import median_ms  # noqa: E402  (CUDA-event medians, warm-up first)

#: (block_m, block_n, num_warps, num_stages[, split_d]) per kernel and head dim
FWD = {64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3),
            (128, 128, 8, 2), (128, 128, 4, 3), (256, 64, 8, 3)],
       128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3),
             (128, 32, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3)]}
BWD = {64: [(32, 128, 8, 2), (16, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2),
            (64, 128, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 4, 2)],
       128: [(16, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2), (64, 64, 8, 2),
             (32, 64, 4, 2)]}
# No num_stages=1 for the dK/dV kernel: with Triton 3.6 on an H200, 32x128/w8/s1 at D=128
# read shared memory out of bounds (compute-sanitizer), which ends the CUDA context.


def time_one(kind: str, qkv_, dout, causal: bool) -> float:
    """Median ms of the forward (``kind="fwd"``) or of the backward alone."""
    import torch

    import qkv

    if kind == "fwd":
        with torch.no_grad():
            return median_ms(lambda: qkv.attention(*qkv_, causal=causal, backend="triton"),
                             10, 1)
    if kind == "bwd-det":  # dQ in its own pass, no atomics; the tuner's own configs
        from qkv.kernels.triton.ops import triton_attention

        out, _ = triton_attention(*qkv_, scale=qkv_[0].shape[-1] ** -0.5,
                                  right=0 if causal else None, deterministic=True)
    else:
        out = qkv.attention(*qkv_, causal=causal, backend="triton")
    return median_ms(lambda: torch.autograd.grad(out, qkv_, dout, retain_graph=True),
                     10, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--budget", type=float, default=90.0, help="seconds; stops sweeping past it")
    args = p.parse_args(argv)
    import torch

    from qkv.kernels.triton import autotune

    if not torch.cuda.is_available():
        print("gpu_sweep.py: error: no CUDA device", file=sys.stderr)
        return 2
    deadline = time.perf_counter() + args.budget
    rows = []
    n = args.length
    for d in args.dims:
        b, h = 16384 // n, 2048 // d
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g).bfloat16()
                   .requires_grad_() for _ in range(3))
        dout = torch.randn(b, h, n, d, device="cuda", generator=g).bfloat16()
        for causal in (False, True):
            fl = 4.0 * b * h * n * n * d / (2 if causal else 1)
            for kind, table in (("fwd", FWD), ("bwd", BWD), ("bwd-det", {d: [None]})):
                for cfg in table[d]:
                    if time.perf_counter() > deadline:
                        rows.append(dict(D=d, causal=causal, kind=kind, config=cfg,
                                         error="time budget"))
                        continue
                    row = dict(D=d, causal=causal, kind=kind, config=cfg)
                    try:
                        with (autotune.override(autotune.Config(*cfg)) if cfg
                              else contextlib.nullcontext()):
                            ms = time_one(kind, (q, k, v), dout, causal)
                        row["ms"] = round(ms, 4)
                        row["tflops"] = round((1 if kind == "fwd" else 2.5) * fl / ms / 1e9, 1)
                    except Exception as exc:  # does not fit this device: a data point
                        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                    rows.append(row)
                    print(f"D={d:4d} causal={causal!s:5s} {kind} {cfg!s:22s} " +
                          (f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row
                           else row["error"]), flush=True)
                    if os.environ.get("OUT"):
                        Path(os.environ["OUT"], "gpu_sweep.json").write_text(json.dumps(
                            dict(device=torch.cuda.get_device_name(), length=n, rows=rows),
                            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
