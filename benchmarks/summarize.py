"""Code-to-text summarization on the held-out test modules: a trained run vs three baselines.

    python benchmarks/summarize.py runs/summarize [--beam 4] [--length-penalty 0.6]
                                   [--no-repeat-ngram 3,0] [--limit N] [--json out.json]
                                   [--examples 5]

One table: ROUGE-L F1, smoothed BLEU-4 (CodeXGLUE's), exact match (all x100, means over
the test pairs) for the model and for (1) the function name in words, (2) TF-IDF retrieval
of the nearest training function's summary, (3) the first line of the body; plus the
model's training steps and wall time (from its checkpoint history). ``--examples N`` also
prints N test functions with the reference and every system's output.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from qkv.decode import load_run
from qkv.metrics import bleu_tokens, corpus_scores, rouge_l, sentence_bleu
from qkv.summarizer import (
    BEAM,
    LENGTH_PENALTY,
    NO_REPEAT_NGRAM,
    check_summarize_run,
    summarize_sources,
)
from qkv.tasks import get_task
from qkv.tasks.summary_baselines import Retrieval, first_line_baseline, name_baseline


def _training(run) -> dict:
    hist = run.state.get("history", [])
    secs = [h["seconds"] for h in hist if "seconds" in h]
    return {"steps": run.step, "seconds": secs[-1] if secs else None,
            "batch_size": run.config.batch_size}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="run directory of qkv train summarize")
    ap.add_argument("--beam", type=int, default=BEAM)
    ap.add_argument("--length-penalty", type=float, default=LENGTH_PENALTY)
    ap.add_argument("--no-repeat-ngram", default=str(NO_REPEAT_NGRAM),
                    help="comma-separated values; one model row each (0: no limit)")
    ap.add_argument("--limit", type=int, default=None, help="first N test pairs only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--examples", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    run = load_run(args.run)
    check_summarize_run(run)
    options = {k: v for k, v in run.config.task_options.items() if k != "train_pairs"}
    task = get_task("summarize", **options)
    corpus = task.corpus
    test = corpus.splits["test"][: args.limit] if args.limit else corpus.splits["test"]
    train = corpus.splits["train"]
    refs = [p["target"] for p in test]

    t0 = time.perf_counter()
    models = {}
    for n in [int(x) for x in args.no_repeat_ngram.split(",")]:
        label = f"qkv seq2seq (beam {args.beam}, lp {args.length_penalty}" + (
            f", no rep. {n}-gram)" if n else ")")
        models[label] = summarize_sources(run, [p["source"] for p in test], beam=args.beam,
                                          length_penalty=args.length_penalty,
                                          no_repeat_ngram=n)
    t_model = (time.perf_counter() - t0) / len(models)
    model_out = next(iter(models.values()))
    retrieval = Retrieval([p["source"] for p in train], [p["target"] for p in train])
    systems = {
        **models,
        "baseline: name in words": [name_baseline(p["name"]) for p in test],
        "baseline: retrieval (TF-IDF)": retrieval([p["source"] for p in test]),
        "baseline: first body line": [first_line_baseline(p["first_line"]) for p in test],
    }
    scores = {name: corpus_scores(out, refs) for name, out in systems.items()}
    training = _training(run)

    m = corpus.manifest
    print(f"test split: {len(test)} functions from {m['modules_per_split']['test']} held-out "
          f"modules; training split {m['pairs']['train']} pairs "
          f"(corpus sha256 {m['sha256'][:12]}, Python {m['versions']['python']})")
    wall = "?" if training["seconds"] is None else f"{training['seconds'] / 60:.1f} min"
    print(f"model: {run.config.model_config(run.tokenizer.vocab_size)}")
    print(f"trained {training['steps']} steps x {training['batch_size']} in {wall} "
          f"(wall clock, {platform.machine()}); decoding the test split took {t_model:.0f} s "
          f"per model row (torch threads {torch.get_num_threads()})")
    head = f"{'system':52s} {'ROUGE-L F1':>10s} {'BLEU-4':>8s} {'exact':>7s}"
    print(head)
    print("-" * len(head))
    for name, s in scores.items():
        print(f"{name:52s} {s['rouge_l']:10.2f} {s['bleu4']:8.2f} {s['exact']:7.2f}")
    best = max((n for n in scores if n.startswith("baseline")),
               key=lambda n: scores[n]["rouge_l"])
    best_bleu = max((n for n in scores if n.startswith("baseline")),
                    key=lambda n: scores[n]["bleu4"])
    beats = any(scores[m]["rouge_l"] > scores[best]["rouge_l"]
                and scores[m]["bleu4"] > scores[best_bleu]["bleu4"] for m in models)
    print(f"model beats the best baseline on both ROUGE-L and BLEU-4: {beats}")

    if args.examples:
        ranked = sorted(range(len(test)), key=lambda i: -sentence_bleu(model_out[i], refs[i]))
        picks = ranked[: (args.examples + 1) // 2] + ranked[-(args.examples // 2):] \
            if args.examples > 1 else ranked[:1]
        for i in picks:
            p = test[i]
            b, r = sentence_bleu(model_out[i], refs[i]), rouge_l(model_out[i], refs[i])
            print(f"\n{p['module']}.{p['name']}  (BLEU {100 * b:.1f}, ROUGE-L {100 * r:.1f})")
            print(f"  {'reference':34s}: {refs[i]}")
            for name, out in systems.items():
                short = name.replace("baseline: ", "").replace("qkv seq2seq ", "model ")
                print(f"  {short[:34]:34s}: {out[i]}")
    result = {"scores": scores, "training": training, "beam": args.beam,
              "length_penalty": args.length_penalty, "test_pairs": len(test),
              "decode_seconds": t_model, "manifest": m, "beats_best_baseline": beats,
              "command": " ".join(["python", "benchmarks/summarize.py", *(argv or sys.argv[1:])]),
              "outputs": [{"module": p["module"], "name": p["name"], "reference": r,
                           **{n: systems[n][i] for n in systems}}
                          for i, (p, r) in enumerate(zip(test, refs, strict=True))],
              "tokens_per_reference": sum(len(bleu_tokens(r)) for r in refs) / len(refs)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
