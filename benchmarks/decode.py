"""Greedy decoding with and without the KV cache, optionally two versions of qkv side by side.

::

    python benchmarks/decode.py                       # cached vs uncached, this qkv
    python benchmarks/decode.py --other /path/to/src  # and an older qkv, interleaved

The model is ``qkv train``'s default seq2seq model (untrained, seed 0) on one ``dates``
example, decoding 64 tokens (batch 1, one thread, inference mode), as in the decode row of
``benchmarks/overhead.py``. Each round runs every decode once, in turns; the table gives
the medians, the cached / uncached ratio of each version and, with ``--other``, this
version's cached time over the other's. Both versions must produce the same tokens.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

from versions import load_qkv  # benchmarks/versions.py: a second qkv, side by side

ROOT = Path(__file__).resolve().parents[1]


def _decoders(pkg: str, max_len: int):
    """(cached, uncached) greedy decodes of the default model of package ``pkg``."""
    s2s = importlib.import_module(f"{pkg}.models.seq2seq")
    task = importlib.import_module(f"{pkg}.tasks").get_task("dates")
    tok = task.tokenizer()
    torch.manual_seed(0)
    model = s2s.Transformer(s2s.TransformerConfig(vocab_size=tok.vocab_size, dropout=0.0))
    model.eval()
    src = tok.batch([s for s, _ in task.batch(0, 0, 1)])  # (1, Ls)

    def run(cache: bool):
        return lambda: model.greedy(src, max_len=max_len, use_cache=cache, stop_at_eos=False)
    return run(True), run(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", type=Path, default=None, help="another qkv's src folder")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "src"))
    import qkv  # noqa: F401  (this checkout's)

    runs = {}
    versions = [("this", "qkv")]
    if args.other is not None:
        load_qkv(args.other.resolve(), "qkv_other")
        versions.append(("other", "qkv_other"))
    for label, pkg in versions:
        runs[f"{label} cached"], runs[f"{label} uncached"] = _decoders(pkg, args.tokens)
    times = {name: [] for name in runs}
    with torch.inference_mode():
        outs = {name: f() for name, f in runs.items()}  # warm-up
        if len({tuple(o.flatten().tolist()) for o in outs.values()}) != 1:
            raise SystemExit("the decodes disagree: not the same model, or a bug")
        for _ in range(args.rounds):
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"greedy decode, {args.tokens} tokens, batch 1, 1 thread, median of {args.rounds} "
          "interleaved rounds")
    for label, _ in versions:
        c, u = med[f"{label} cached"], med[f"{label} uncached"]
        print(f"{label:<6} cached {c * 1e3:7.2f} ms  uncached {u * 1e3:7.2f} ms  "
              f"ratio {c / u:.3f}")
    if args.other is not None:
        print(f"this cached / other cached: {med['this cached'] / med['other cached']:.3f}")


if __name__ == "__main__":
    main()
