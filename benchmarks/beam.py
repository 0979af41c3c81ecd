"""Beam search with the lean cached step against the same search through the modules.

::

    python benchmarks/beam.py                    # beam 4, 48 tokens, 1 thread
    python benchmarks/beam.py --beam 8 --rounds 11 --threads 2

The model is ``qkv train``'s default seq2seq shape (d_model 64, 4 heads, 2 + 2 layers, ff
256) with random weights and a vocabulary of 1000, decoding ``--tokens`` tokens (no early
EOS: random weights rarely produce it) from a 40-token source. "modules" runs the same
search with the lean step refused, as when a hook is registered. Both run in interleaved
rounds in this one process; the ratio of the medians is what to compare between runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkv.models import decode_step
from qkv.models.seq2seq import Transformer, TransformerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=1000, dropout=0.0)).eval()
    src = torch.randint(3, 1000, (1, 40))  # (1, Ls)
    build = decode_step.LeanStep.build
    refuse = classmethod(lambda cls, *a, **kw: None)

    def once(lean: bool) -> float:
        decode_step.LeanStep.build = build if lean else refuse
        try:
            start = time.perf_counter()
            model.beam_search(src, beam=args.beam, max_len=args.tokens)
            return time.perf_counter() - start
        finally:
            decode_step.LeanStep.build = build

    times: dict[bool, list[float]] = {True: [], False: []}
    once(True), once(False)  # warm-up
    for _ in range(args.rounds):
        for lean in (True, False):
            times[lean].append(once(lean))
    lean, mods = statistics.median(times[True]), statistics.median(times[False])
    print(f"beam {args.beam}, {args.tokens} tokens, {args.threads} thread(s), "
          f"{args.rounds} rounds")
    print(f"lean step {lean * 1e3:8.1f} ms   modules {mods * 1e3:8.1f} ms   "
          f"ratio {lean / mods:.2f}")


if __name__ == "__main__":
    main()
