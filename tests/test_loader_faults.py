"""Fault tests of the model loader: each corruption of a model directory gives one
ValueError that lists every problem, and nothing is ever half-loaded or left blocking.

A tiny BERT (hidden size 8, one layer) with the real tokenizer keeps them fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import qkv
from qkv.models.bert import BertConfig
from qkv.models.loading import expected_shapes


def _source() -> Path:
    from qkv.models.loading import resolve

    return resolve("all-MiniLM-L6-v2")[0]


CONFIG = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64,
          "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
          "pad_token_id": 0}


def tiny_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = expected_shapes(BertConfig.from_dict(CONFIG))
    return {k: 0.1 * torch.randn(*s, generator=g) for k, s in shapes.items()}


def tiny_model(tmp_path: Path, *, config=None, tensors=None, raw_config: str | None = None
               ) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    shutil.copy(_source() / "tokenizer.json", d / "tokenizer.json")
    text = raw_config if raw_config is not None else json.dumps(config or CONFIG)
    (d / "config.json").write_text(text)
    save_file(tiny_tensors() if tensors is None else tensors, str(d / "model.safetensors"))
    return d


def _problems(d: Path) -> str:
    with pytest.raises(ValueError) as e:
        qkv.load_pretrained(d)
    return str(e.value)


def test_the_tiny_model_loads(tmp_path):
    m = qkv.load_pretrained(tiny_model(tmp_path))
    assert m.config.hidden_size == 8


def test_five_planted_problems_are_all_listed(tmp_path):
    """Before: 4 of 5 (a NaN weight was hidden behind a shape or dtype problem)."""
    t = tiny_tensors()
    del t["encoder.layer.0.attention.self.query.weight"]  # 1 missing
    t["encoder.layer.0.output.dense.bias"] = torch.zeros(7)  # 2 shape
    t["embeddings.LayerNorm.weight"] = torch.ones(8, dtype=torch.int32)  # 3 dtype
    t["encoder.layer.5.output.dense.bias"] = torch.zeros(8)  # 4 unexpected
    t["encoder.layer.0.attention.self.key.weight"][2, 3] = float("nan")  # 5 value
    msg = _problems(tiny_model(tmp_path, tensors=t))
    assert "5 problems" in msg, msg
    for part in ("missing key: encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.0.output.dense.bias has shape [7]; expected [8]",
                 "embeddings.LayerNorm.weight has dtype I32",
                 "unexpected key: encoder.layer.5.output.dense.bias",
                 "encoder.layer.0.attention.self.key.weight holds NaN or infinite values"):
        assert part in msg, msg


def test_invalid_config_values_are_all_listed(tmp_path):
    """Before: NaN/inf layer_norm_eps and out-of-range pad ids loaded; hidden_act [] said
    only "unhashable type: 'list'"."""
    for eps, pad in ((float("nan"), -1), (float("inf"), 10**9)):
        cfg = {**CONFIG, "layer_norm_eps": eps, "pad_token_id": pad, "hidden_act": []}
        msg = _problems(tiny_model(tmp_path, config=cfg))
        shutil.rmtree(tmp_path / "tiny")
        assert "3 problems" in msg, msg
        assert f"layer_norm_eps must be a finite positive number; got {eps}" in msg
        assert f"pad_token_id {pad} is not a token id" in msg
        assert "hidden_act [] is not supported" in msg
        assert "unhashable" not in msg


def test_a_deeply_nested_config_is_a_problem_not_a_recursionerror(tmp_path):
    n = 100_000
    msg = _problems(tiny_model(tmp_path, raw_config="[" * n + "]" * n))
    assert "config.json nests too deeply" in msg


def test_a_tokenizer_id_past_the_embedding_table_is_found_at_load(tmp_path):
    """Before: an IndexError at explain time. The id gap keeps the token count at 30522."""
    d = tiny_model(tmp_path)
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    word = next(w for w, i in vocab.items() if i == 2000)
    vocab[word] = 40_000
    (d / "tokenizer.json").write_text(json.dumps(tok))
    msg = _problems(d)
    assert "ids up to 40000 but the model's vocab_size is 30522" in msg, msg


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (opening a FIFO for reading blocks until a writer comes)."""
    def stop(*_):
        raise TimeoutError("the loader blocked")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["symlink loop", "FIFO", "directory", "broken symlink"])
def test_something_else_where_the_weights_should_be_is_named(tmp_path, kind):
    """Before: all of these were reported as "missing model.safetensors"."""
    d = tiny_model(tmp_path)
    w = d / "model.safetensors"
    w.unlink()
    if kind == "symlink loop":
        os.symlink("loop-b", d / "loop-a")
        os.symlink("loop-a", d / "loop-b")
        os.symlink("loop-a", w)
        want = "model.safetensors is a symlink loop"
    elif kind == "FIFO":
        os.mkfifo(w)
        want = "model.safetensors is a FIFO (named pipe), not a file"
    elif kind == "directory":
        w.mkdir()
        want = "model.safetensors is a directory, not a file"
    else:
        os.symlink("gone.safetensors", w)
        want = "model.safetensors is a broken symlink (to 'gone.safetensors')"
    with _deadline(30):
        msg = _problems(d)
    assert want in msg, msg
    assert "missing model.safetensors" not in msg


def test_infinite_weights_give_no_numpy_warning(tmp_path):
    """Before: "RuntimeWarning: invalid value encountered in reduce" reached stderr."""
    t = tiny_tensors()
    t["encoder.layer.0.intermediate.dense.weight"][0, 0] = float("inf")
    t["encoder.layer.0.intermediate.dense.weight"][1, 1] = float("-inf")
    d = tiny_model(tmp_path, tensors=t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msg = _problems(d)
    assert "encoder.layer.0.intermediate.dense.weight holds NaN or infinite values" in msg
