"""Summarise Python functions with a run trained on the ``summarize`` task.

:func:`summarize_code` finds every function of a piece of Python source (or one, by
name), reads each as the model was trained to read code (docstring removed, identifiers
split, cut to the run's ``max_source_tokens`` subwords) and writes its summary with beam
search, a length penalty and no repeated token trigram. Each :class:`Summary` carries the
cross-attention of the decoder as an :class:`~qkv.AttentionMap` whose rows are the
summary's subwords and columns the code's subwords, with word spans on both sides
(``.merge_words()`` gives summary words x code words).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention_map import AttentionMap
from .tasks.code_corpus import functions_in
from .tasks.summarize import truncate_source

__all__ = ["Summary", "check_summarize_run", "summarize_code", "summarize_sources"]

#: Decoding defaults of ``qkv summarize`` and the benchmark: beam width, GNMT length
#: penalty, and no repeated token trigram (small models otherwise loop: "a new new new").
BEAM, LENGTH_PENALTY, NO_REPEAT_NGRAM = 4, 0.6, 3


@dataclass
class Summary:
    """One function: its name, the code words the model read, the summary it wrote, the
    docstring's own summary (None without a docstring), and the cross-attention."""

    name: str
    source: str
    summary: str
    docstring: str | None
    attention: AttentionMap | None


def check_summarize_run(run) -> None:
    """ValueError unless ``run`` (a loaded run) was trained on the ``summarize`` task."""
    task = run.config.task
    if task != "summarize":
        raise ValueError(f"this run was trained on task {task!r}, not 'summarize'; train one "
                         "with: qkv train summarize")


def _max_source(run) -> int:
    return int(run.config.task_options.get("max_source_tokens", 64))


def _decode(run, src: torch.Tensor, *, beam: int, length_penalty: float,
            no_repeat_ngram: int) -> torch.Tensor:
    max_len = int(run.state.get("max_target_len", 40)) + 1
    if beam == 1 and not no_repeat_ngram:
        return run.model.greedy(src, max_len=max_len)  # (B, T)
    return run.model.beam_search(src, beam=beam, max_len=max_len,
                                 length_penalty=length_penalty,
                                 no_repeat_ngram=no_repeat_ngram)[0]  # (B, T)


@torch.no_grad()
def summarize_sources(run, sources: Sequence[str], *, beam: int = BEAM,
                      length_penalty: float = LENGTH_PENALTY,
                      no_repeat_ngram: int = NO_REPEAT_NGRAM, batch_size: int = 64
                      ) -> list[str]:
    """Summaries of already prepared sources (code words, as in the corpus), in order."""
    check_summarize_run(run)
    tok, n = run.tokenizer, _max_source(run)
    device = next(run.model.parameters()).device
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        chunk = [truncate_source(tok, s, n)[0] for s in sources[i : i + batch_size]]
        src = tok.batch(chunk).to(device)  # (B, Ls)
        ids = _decode(run, src, beam=beam, length_penalty=length_penalty,
                      no_repeat_ngram=no_repeat_ngram)  # (B, T)
        out.extend(tok.decode(row.tolist()) for row in ids)
    return out


def _spans(labels: list[str], starts: list[bool]) -> tuple[list[str], list[tuple[int, int]]]:
    """Words and their token ranges: a new word starts where ``starts`` is True."""
    words: list[str] = []
    spans: list[tuple[int, int]] = []
    for i, (label, new) in enumerate(zip(labels, starts, strict=True)):
        if new or not spans:
            words.append(label)
            spans.append((i, i + 1))
        else:
            words[-1] += label
            spans[-1] = (spans[-1][0], i + 1)
    return words, spans


@torch.no_grad()
def summarize_code(run, code: str, *, function: str | None = None, beam: int = BEAM,
                   length_penalty: float = LENGTH_PENALTY,
                   no_repeat_ngram: int = NO_REPEAT_NGRAM, attention: bool = True
                   ) -> list[Summary]:
    """Summaries of every function of ``code`` (or the one named ``function``, e.g.
    ``"Cache.get"`` or ``"get"``), in file order.

    ValueError for empty code, code that does not parse, code without a function, or a
    ``function`` name that is not there (the message lists the names that are).
    """
    check_summarize_run(run)
    if not isinstance(code, str):
        raise TypeError(f"code must be a str; got {type(code).__name__}")
    if not code.strip():
        raise ValueError("the code is empty; give a Python file or pipe Python code on stdin")
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be an int >= 1; got {beam!r}")
    funcs = functions_in(code)
    if not funcs:
        raise ValueError("the code has no function (def) to summarise")
    if function is not None:
        chosen = [f for f in funcs if f[0] == function or f[0].rsplit(".", 1)[-1] == function]
        if not chosen:
            names = ", ".join(f[0] for f in funcs[:12]) + (" ..." if len(funcs) > 12 else "")
            raise ValueError(f"no function named {function!r} in the code; it has: {names}")
        funcs = chosen
    tok, model = run.tokenizer, run.model
    device = next(model.parameters()).device
    sources = [truncate_source(tok, f[1], _max_source(run))[0] for f in funcs]
    results: list[Summary] = []
    for (name, _, _, doc), source in zip(funcs, sources, strict=True):
        src = tok.batch([source]).to(device)  # (1, Ls)
        ids = _decode(run, src, beam=beam, length_penalty=length_penalty,
                      no_repeat_ngram=no_repeat_ngram)[0].tolist()
        text = tok.decode(ids)
        amap = None
        if attention:
            n = ids.index(model.config.eos_id) if model.config.eos_id in ids else len(ids)
            out_ids = ids[: max(n, 1)]
            q_labels, q_starts = tok.pieces(out_ids)
            k_labels, k_starts = tok.pieces(src[0].tolist())
            q_words, q_spans = _spans(q_labels, q_starts)
            k_words, k_spans = _spans(k_labels, k_starts)
            amap = model.cross_attention_map(
                src, torch.tensor([out_ids], device=device), source_tokens=k_labels,
                output_tokens=q_labels, title=f"{name}: {text}",
                model=f"qkv seq2seq summarize (step {run.step})")
            amap.words, amap.word_spans = q_words, q_spans
            amap.key_words, amap.key_word_spans = k_words, k_spans
        results.append(Summary(name=name, source=source, summary=text, docstring=doc,
                               attention=amap))
    return results
