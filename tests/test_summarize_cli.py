"""The summarize task end to end: a tiny model memorises 20 real (code, docstring) pairs
through the training loop, ``qkv summarize`` reads the same functions from their source
files and writes the memorised summaries, and every bad input is one line, exit code 2."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import pytest

from qkv.cli import main
from qkv.decode import load_run
from qkv.models.seq2seq import TransformerConfig
from qkv.summarizer import summarize_code, summarize_sources
from qkv.tasks import get_task
from qkv.train import TrainConfig, evaluate, train

from helpers import one_thread

SMALL = ["json", "email", "asyncio", "textwrap", "shlex", "argparse", "logging",
         "concurrent", "xml", "http", "urllib", "importlib"]
OPTIONS = {"modules": SMALL, "vocab_size": 1000, "max_source_tokens": 24,
           "max_target_tokens": 40, "train_pairs": 20}


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("QKV_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("sum") / "run"
    model = TransformerConfig(vocab_size=None, d_model=64, num_heads=2, encoder_layers=1,
                              decoder_layers=1, ff_dim=128, dropout=0.0)
    cfg = TrainConfig(task="summarize", task_options=OPTIONS, steps=120, batch_size=20,
                      lr=3e-3, warmup=20, model=model, eval_every=120, eval_size=20,
                      checkpoint_every=120)
    with one_thread():
        train(cfg, out, progress=False)
    yield out, get_task("summarize", **OPTIONS)
    mp.undo()


def run(capsys, *args, stdin: str | None = None) -> tuple[int, str, str]:
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with pytest.raises(SystemExit) as e, one_thread():
            main([str(a) for a in args])
    finally:
        sys.stdin = old
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_tiny_model_memorises_20_pairs(memorised):
    out, task = memorised
    pairs = task.examples("train")
    assert len(pairs) == 20
    r = load_run(out)
    assert r.tokenizer == task.tokenizer()
    assert evaluate(r.model, r.tokenizer, pairs, max_len=task.max_target_len + 1) == 1.0
    beamed = summarize_sources(r, [s for s, _ in pairs], beam=3, length_penalty=0.6)
    assert sum(b == t for b, (_, t) in zip(beamed, pairs, strict=True)) >= 18


def _source_file(module: str) -> Path:
    return Path(importlib.util.find_spec(module).origin)


def test_cli_summarizes_functions_of_a_real_file(memorised, capsys):
    out, task = memorised
    pair = task.corpus.splits["train"][0]
    path = _source_file(pair["module"])
    code, stdout, err = run(capsys, "summarize", out, f"{path}:{pair['name']}", "--beam", "1")
    assert code == 0, err
    assert stdout == f"{pair['name']}: {pair['target']}\n"
    # the whole file: one line per function, the memorised one among them
    code, stdout, err = run(capsys, "summarize", out, path)
    assert code == 0, err
    lines = stdout.splitlines()
    assert len(lines) > 1 and all(": " in ln for ln in lines)
    # stdin, one function
    code, stdout, err = run(capsys, "summarize", out, "-", "--function",
                            pair["name"].split(".")[-1], "--beam", "1", stdin=path.read_text())
    assert code == 0, err
    assert f"{pair['name']}: {pair['target']}\n" in stdout


def test_attention_views(memorised, capsys, tmp_path):
    out, task = memorised
    pair = task.corpus.splits["train"][1]
    target = f"{_source_file(pair['module'])}:{pair['name']}"
    code, stdout, err = run(capsys, "summarize", out, target, "--show-attention")
    assert code == 0, err
    assert "cross-attention, decoder layer 0, head 0" in stdout and "head 1" in stdout
    for name in ("a.png", "a.html"):
        code, _, err = run(capsys, "summarize", out, target, "-o", tmp_path / name)
        assert code == 0 and f"wrote {tmp_path / name}" in err
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert "<html" in (tmp_path / "a.html").read_text().lower()
    r = load_run(out)
    (s,) = summarize_code(r, _source_file(pair["module"]).read_text(), function=pair["name"])
    words = s.attention.merge_words()
    assert words.weights.shape[-2:] == (len(s.summary.split()), len(s.source.split()))
    assert words.tokens == s.summary.split() and words.key_tokens == s.source.split()


def test_cli_errors_are_one_line(memorised, capsys, tmp_path):
    out, _ = memorised
    bad = tmp_path / "bad.py"
    bad.write_text("def broken(:\n    pass\n")
    nofunc = tmp_path / "nofunc.py"
    nofunc.write_text("x = 1\nclass A:\n    y = 2\n")
    good = tmp_path / "good.py"
    good.write_text("def add(a, b):\n    return a + b\n")
    other = tmp_path / "rev"
    with one_thread():
        small = TransformerConfig(vocab_size=None, d_model=16, num_heads=2, ff_dim=16,
                                  encoder_layers=1, decoder_layers=1)
        train(TrainConfig(task="reverse", steps=2, model=small, eval_size=4), other,
              progress=False)
    cases = [
        (["summarize", out, bad], "does not parse"),
        (["summarize", out, nofunc], "no function"),
        (["summarize", out, "-"], "empty"),
        (["summarize", other, good], "trained on task 'reverse'"),
        (["summarize", out, f"{good}:sub"], "no function named 'sub'"),
        (["summarize", out, tmp_path / "missing.py"], "no such file"),
        (["summarize", tmp_path / "norun", good], "does not exist"),
        (["summarize", out, good, "--beam", "0"], "--beam"),
        (["summarize", out, f"{good}:add", "--function", "sub"], "two functions"),
        (["summarize", out, good, "-o", tmp_path / "x.jpg"], ".png, .svg or .html"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *args, stdin="")
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert err.count("\n") == 1 and err.startswith("qkv: error: "), err
