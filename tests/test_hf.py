"""qkv.capture on Hugging Face models, and qkv as their attention implementation.

Tiny random models built from configs (tests/hf_models.py): BERT, GPT-2, Llama (GQA +
rotary), Mistral (sliding window), BART (cross-attention), ViT. Reference: the same model
with ``attn_implementation="eager"`` and ``output_attentions=True``.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import qkv

transformers = pytest.importorskip("transformers")
import hf_models  # noqa: E402
import qkv.hf  # noqa: E402

qkv.hf.register()


def eager_attentions(m, inp) -> dict[str, torch.Tensor]:
    """Module path -> weights (B, H, Lq, Lk) from the eager path's output_attentions."""
    m = copy.deepcopy(m)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        out = m(**inp, output_attentions=True)
    return dict(zip(attention_paths(m, out), all_attentions(out), strict=True))


def all_attentions(out) -> list[torch.Tensor]:
    if getattr(out, "encoder_attentions", None) is not None:  # encoder-decoder
        return [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]
    return list(out.attentions)


def attention_paths(m, out) -> list[str]:
    """The module paths of the attentions, in the order all_attentions lists them."""
    names = [n for n, mod in m.named_modules() if type(mod).__name__.endswith(
        ("SelfAttention", "Attention")) and hasattr(mod, "is_causal")]
    if getattr(out, "encoder_attentions", None) is not None:
        enc = [n for n in names if n.startswith("encoder.")]
        dec = [n for n in names if n.startswith("decoder.") and n.endswith("self_attn")]
        cross = [n for n in names if n.endswith("encoder_attn")]
        return enc + dec + cross
    return names


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_captured_weights_equal_eager_attentions_and_outputs_are_unchanged(kind):
    m = hf_models.model(kind, "sdpa")
    inp = hf_models.inputs(kind)
    with torch.no_grad():
        plain = m(**inp)[0]
        with qkv.capture(m) as cap:
            out = m(**inp)[0]
    assert torch.equal(out, plain)
    want = eager_attentions(m, inp)
    assert len(cap.calls) == len(want) > 0
    for call, w in zip(cap.calls, cap.weights, strict=True):
        ref = want[call.module]
        assert w.shape == ref.shape, call.module
        assert (w - ref).abs().max() <= 1e-5, (kind, call.module)
    if kind in ("llama", "mistral"):
        assert cap.calls[0].heads == 4 and cap.calls[0].kv_heads in (2, 4)


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_qkv_implementation_matches_sdpa_and_returns_eager_weights(kind):
    """Outputs: qkv's error against a float64 model is within 2x (+1e-5) of sdpa's
    (the same-dtype rule); weights with output_attentions equal eager's within 1e-5."""
    m = hf_models.model(kind, "sdpa")
    inp = hf_models.inputs(kind)
    m64 = copy.deepcopy(m).double()
    m64.set_attn_implementation("eager")
    mq = copy.deepcopy(m)
    mq.set_attn_implementation("qkv")
    inp64 = {k: v.double() if v.is_floating_point() else v for k, v in inp.items()}
    with torch.no_grad():
        ref = m64(**inp64)[0]
        base = m(**inp)[0]
        out = mq(**inp)[0]
        withw = mq(**inp, output_attentions=True)
    real = slice(None)
    if "attention_mask" in inp and kind != "bart":
        real = inp["attention_mask"].bool()  # padded positions carry no meaning
    base_err = (base.double() - ref)[real].abs().max()
    err = (out.double() - ref)[real].abs().max()
    assert err <= 2 * base_err + 1e-5, (float(err), float(base_err))
    want = eager_attentions(m, inp)
    got = all_attentions(withw)
    assert len(got) == len(want)
    for w, ref_w in zip(got, want.values(), strict=True):
        assert (w - ref_w).abs().max() <= 1e-5


def test_from_pretrained_with_attn_implementation_qkv(tmp_path):
    hf_models.save("llama", tmp_path)
    m = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="qkv").eval()
    assert m.config._attn_implementation == "qkv"
    inp = hf_models.inputs("llama")
    calls = []
    orig = qkv.hf.attention
    try:
        qkv.hf.attention = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
        with torch.no_grad():
            out = m(**inp, output_attentions=True)
    finally:
        qkv.hf.attention = orig
    assert len(calls) == 2  # every layer's attention went through qkv.attention
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 11, 11)


def test_minilm_through_hf_bert_equals_qkvs_own_bert():
    """The real all-MiniLM-L6-v2 run by transformers' BertModel (sdpa) under capture gives
    the weights of qkv's own BERT implementation."""
    from qkv.models.loading import resolve

    path, _ = resolve("all-MiniLM-L6-v2")
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    net = qkv.load_pretrained()
    text = "The animal didn't cross the street because it was too tired"
    amap = net.attend(text, keep_qkv=False)
    ids, mask, types = net.tokenize([text])
    with torch.no_grad(), qkv.capture(hf) as cap:
        hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    got = cap.to_map(amap.tokens)
    assert got.weights.shape == amap.weights.shape == (6, 12, len(amap.tokens),
                                                       len(amap.tokens))
    assert abs(got.weights - amap.weights).max() <= 1e-5


def test_import_qkv_does_not_import_transformers():
    code = "import sys, qkv, qkv.hf; print('transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "False"


def test_softcap_is_refused_with_the_fix():
    m = hf_models.model("llama", "qkv")
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="eager"):
        qkv.hf.attention_forward(m.layers[0].self_attn, q, q, q, None, softcap=30.0)
