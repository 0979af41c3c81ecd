"""``qkv explain --model DIR`` on saved tiny Hugging Face models of every text kind."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

import hf_models
from qkv.attention_map import AttentionMap
from qkv.cli import main
from qkv.head_choice import choose_head
from qkv.models import hf

TEXT = "the animal didn't cross the street because it was too tired"
HEADS = {"bert": 3, "gpt2": 3, "llama": 4, "mistral": 4, "bart": 3}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for kind in hf_models.TEXT_KINDS:
        d = tmp_path_factory.mktemp(kind)
        hf_models.save(kind, d)
        out[kind] = d
    return out


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["explain", *args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


@pytest.mark.parametrize("kind", hf_models.TEXT_KINDS)
def test_explain_any_model_directory(capsys, dirs, kind):
    code, out, err = run(capsys, "--model", str(dirs[kind]), TEXT, "--json", "--tokens")
    assert code == 0, err
    d = json.loads(out)
    assert d["word"] == "it" and d["model"] == dirs[kind].name
    w = np.asarray(d["map"]["weights"])
    assert w.shape[:2] == (2, HEADS[kind])
    lq, lk = w.shape[2:]
    assert np.allclose(w.sum(-1), 1.0, atol=1e-5)
    if kind == "bart":  # cross-attention: decoder tokens as rows, encoder tokens as columns
        assert d["map"]["key_tokens"] is not None and lq == lk == 11
        assert d["map"]["tokens"][0] == "[CLS]"  # the decoder's start token
    if kind in ("gpt2", "llama", "mistral"):  # causal: nothing above the diagonal
        assert np.all(np.triu(w, k=1) == 0)
        allowed = np.asarray(d["map"]["allowed"])
        assert allowed.shape == (lq, lk) and not allowed[0, 1] and allowed[3, 0]
    if kind == "mistral":  # the sliding window of 4 keys
        assert np.all(w[:, :, 8, :5] == 0) and np.all(w[:, :, 8, 5:9] > 0)
    # the default head: qkv's head rule on this map, whose link is never the diagonal
    amap = AttentionMap.from_json(d["map"])
    want = choose_head(amap, d["index"])
    assert (d["layer"], d["head"]) == (want.layer, want.head)
    if kind != "bart":
        assert abs(d["choice"]["key"] - d["index"]) > 1


def test_explain_writes_html_for_a_decoder(capsys, dirs, tmp_path):
    page = tmp_path / "gpt2.html"
    code, out, err = run(capsys, "--model", str(dirs["gpt2"]), TEXT, "-o", str(page))
    assert code == 0, err
    assert page.stat().st_size > 1000 and "wrote" in out


def test_the_maps_match_a_capture_of_the_same_model(dirs):
    import torch
    from tokenizers import Tokenizer

    import qkv

    maps = hf.attend(dirs["llama"], TEXT)
    model, _ = hf.load(dirs["llama"])
    ids = Tokenizer.from_file(str(dirs["llama"] / "tokenizer.json")).encode(TEXT).ids
    with torch.no_grad(), qkv.capture(model) as cap:
        model(input_ids=torch.tensor([ids]))
    assert np.array_equal(maps["self"].weights,
                          torch.stack([w[0] for w in cap.weights]).numpy())


def test_bert_directories_keep_the_built_in_path(dirs):
    assert not hf.is_hf_dir(dirs["bert"])
    assert all(hf.is_hf_dir(dirs[k]) for k in ("gpt2", "llama", "mistral", "bart"))


def test_missing_files_are_one_line_errors(capsys, dirs, tmp_path):
    (tmp_path / "config.json").write_text((dirs["gpt2"] / "config.json").read_text())
    code, _, err = run(capsys, "--model", str(tmp_path), TEXT)
    assert code == 2 and "missing tokenizer.json, model.safetensors" in err
    assert err.count("\n") == 1


def test_without_transformers_the_error_says_how_to_install(capsys, dirs, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    code, _, err = run(capsys, "--model", str(dirs["gpt2"]), TEXT)
    assert code == 2 and "pip install qkv[hf]" in err and err.count("\n") == 1
