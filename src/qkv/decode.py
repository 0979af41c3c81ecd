"""Use a trained run: load the latest checkpoint of a run directory and decode texts with it.

:func:`load_run` rebuilds the model of a run written by :func:`qkv.train.train` (its config
and tokenizer come from the checkpoint's ``state.json``); :func:`translate` decodes one text
greedily or with beam search and returns the output with the cross-attention map that
produced it (an :class:`~qkv.attention_map.AttentionMap`, ready for :mod:`qkv.viz`).
"""

from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention_map import AttentionMap
from .checkpoint import load_weights
from .models.seq2seq import Transformer
from .tasks import TASKS, CharTokenizer, OutsideTaskWarning, SubwordTokenizer, load_tokenizer
from .train import TrainConfig, build_model, read_run, resolve_device

__all__ = ["Run", "Translation", "display_char", "load_run", "translate"]


@dataclass
class Run:
    """A model ready to use, with what is needed to feed it."""

    model: Transformer
    tokenizer: CharTokenizer | SubwordTokenizer
    config: TrainConfig
    step: int
    state: dict


def load_run(run: Path | str, *, device: str = "cpu") -> Run:
    """Load the latest checkpoint of a run directory for decoding (eval mode).

    Raises ValueError when the directory has no checkpoint, or when the checkpoint's
    weights do not fit its own config (an incompatible or damaged checkpoint).
    """
    ck = read_run(Path(run))
    try:
        cfg = TrainConfig.from_dict(ck.state["config"])
        tok = load_tokenizer(ck.state["tokenizer"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {ck.path} is incompatible: its state.json lacks {e}") \
            from None
    model = build_model(cfg, tok, resolve_device(device))
    load_weights(model, ck.model, ck.path)
    model.eval()
    return Run(model=model, tokenizer=tok, config=cfg, step=ck.step, state=ck.state)


@dataclass
class Translation:
    """One decoded input: the output text and the cross-attention that produced it."""

    text: str
    output: str
    attention: AttentionMap


def display_char(c: str) -> str:
    """A visible label for one character (spaces and invisible marks get a name)."""
    if c == " ":
        return "␣"
    if unicodedata.category(c) in ("Zs", "Zl", "Zp", "Cf", "Cc"):
        return f"U+{ord(c):04X}"
    return c


def translate(run: Run, text: str, *, beam: int = 1) -> Translation:
    """Decode ``text`` with a loaded run (greedy, or beam search with ``beam > 1``).

    ValueError for an empty text or characters outside the model's vocabulary; an
    :class:`~qkv.tasks.OutsideTaskWarning` for a text unlike any the run's task produces
    (the model still answers, but the answer is a guess).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    if not text:
        raise ValueError("the input text is empty; give the text to translate, e.g. "
                         "translate(run, '28 novembre 2026')")
    bad = run.tokenizer.unknown(text)
    if bad:
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad)
        raise ValueError(f"the input has characters outside the vocabulary of this model: "
                         f"{shown}; it was trained on task {run.config.task!r}")
    task = TASKS.get(run.config.task)
    problem = task.input_problem(text, **run.config.task_options) if task else None
    if problem:
        warnings.warn(f"{text!r} is outside what task {run.config.task!r} was trained on: "
                      f"{problem}; the output is a guess", OutsideTaskWarning, stacklevel=2)
    model, tok = run.model, run.tokenizer
    device = next(model.parameters()).device
    src = tok.batch([text]).to(device)  # (1, Ls)
    max_len = int(run.state.get("max_target_len", len(text))) + 1
    if beam == 1:
        out = model.greedy(src, max_len=max_len)  # (1, T)
    else:
        out = model.beam_search(src, beam=beam, max_len=max_len)[0]  # (1, T)
    ids = out[0].tolist()
    n = ids.index(model.config.eos_id) if model.config.eos_id in ids else len(ids)
    output = tok.decode(ids[:n])
    if n == 0:  # an immediate EOS: show the attention of that one step
        ids, labels = ids[:1], [tok.token(ids[0])]
    else:
        ids, labels = ids[:n], [display_char(c) for c in output]
    amap = model.cross_attention_map(
        src, torch.tensor([ids], device=device), source_tokens=[display_char(c) for c in text],
        output_tokens=labels, title=f"{text} -> {output}",
        model=f"qkv seq2seq {run.config.task} (step {run.step})")
    return Translation(text=text, output=output, attention=amap)
