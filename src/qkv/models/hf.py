"""Attention maps of any Hugging Face model directory, through :func:`qkv.capture`.

:func:`attend` loads a directory in the Hugging Face layout (``config.json``, safetensors
weights, ``tokenizer.json``) with ``transformers`` (``attn_implementation="sdpa"``), runs
one text through it under :func:`qkv.capture` and returns the attention of every layer and
head as :class:`~qkv.AttentionMap` objects: one per kind of attention (an encoder's
self-attention; a decoder's causal self-attention; an encoder-decoder's encoder, decoder
and cross-attention). Needs ``pip install qkv[hf]``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from ..attention_map import AttentionMap

__all__ = ["attend", "is_hf_dir", "load"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_hf_dir(path) -> bool:
    """True for a directory with a config.json whose ``model_type`` is not BERT (qkv's
    own BERT reads those)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        return False
    try:
        kind = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return kind != "bert"


def load(path, *, device=None):
    """``(model, tokenizer)`` from a Hugging Face-layout directory, in eval mode."""
    try:
        import transformers
    except ImportError:
        raise ImportError("reading Hugging Face models needs the transformers package; "
                          "install it with `pip install qkv[hf]`") from None
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    missing = [f for f in ("config.json", "tokenizer.json") if not (p / f).is_file()]
    if not any((p / f).is_file() for f in _WEIGHTS):
        missing.append("model.safetensors")
    if missing:
        raise ValueError(f"cannot load {str(path)!r}: missing {', '.join(missing)} (a Hugging "
                         "Face-layout directory holds config.json, model.safetensors and "
                         "tokenizer.json)")
    try:
        model = transformers.AutoModel.from_pretrained(p, attn_implementation="sdpa",
                                                       use_safetensors=True)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"transformers cannot load {str(path)!r} with PyTorch's "
                         f"scaled_dot_product_attention: {' '.join(str(e).split())}") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, Tokenizer.from_file(str(p / "tokenizer.json"))


def attend(path, text: str, pair: str | None = None, *, strict: bool = False,
           device=None) -> dict[str, AttentionMap]:
    """The attention maps of ``text`` (and ``pair``) in the model at ``path``.

    Returns ``{"self": map}`` for an encoder or a decoder, and ``{"encoder": ..,
    "decoder": .., "cross": ..}`` for an encoder-decoder (the text goes to the encoder, and
    shifted right by one, as in training, to the decoder); the cross map has the decoder's
    tokens as rows and the encoder's as columns. Text longer than the model's positions is
    truncated with a warning, or refused with ``strict=True``.
    """
    from ..attention_capture import capture
    from .bert_text import _words

    for name, t in (("text", text), ("pair", pair)):
        if t is not None and (not isinstance(t, str) or not t.strip()):
            raise ValueError(f"{name} must be a non-empty string; got {t!r}")
    model, tok = load(path, device=device)
    cfg = model.config
    enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and len(enc.ids) > limit:
        msg = f"the input has {len(enc.ids)} tokens but the model has {limit} positions"
        if strict:
            raise ValueError(msg + "; shorten the text")
        warnings.warn(msg + f"; keeping the first {limit}", UserWarning, stacklevel=2)
        tok.enable_truncation(limit)
        enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
    if not enc.ids:
        raise ValueError(f"the tokenizer turned {text!r} into no tokens")
    dev = next(model.parameters()).device
    ids = torch.tensor([enc.ids], device=dev)  # (1, L)
    name = Path(path).expanduser().resolve().name
    title = text if pair is None else f"{text}  ‖  {pair}"
    words, spans = _words(enc, text, pair)
    side = {"tokens": [_show(t) for t in enc.tokens],
            "special": [bool(s) for s in enc.special_tokens_mask],
            "words": words, "word_spans": spans}
    kw = {}
    dec_side = side
    if cfg.is_encoder_decoder:
        start = cfg.decoder_start_token_id
        start = cfg.bos_token_id if start is None else start
        dec_ids = [start, *enc.ids[:-1]]
        kw["decoder_input_ids"] = torch.tensor([dec_ids], device=dev)  # (1, L)
        dec_side = {"tokens": [_show(tok.id_to_token(i) or str(i)) for i in dec_ids],
                    "special": [True, *side["special"][:-1]]}
    with torch.no_grad(), capture(model) as cap:
        model(input_ids=ids, **kw)
    if not cap.calls:
        raise ValueError(f"{name} computes attention without PyTorch's "
                         "scaled_dot_product_attention, so no attention was recorded")
    groups = _groups([c.module for c in cap.calls])
    maps = {}
    for role, calls in _roles(groups, cfg.is_encoder_decoder).items():
        rows = dec_side if role in ("decoder", "cross") else side
        extra = {}
        if role == "cross":
            extra = {"key_tokens": side["tokens"], "key_special": side["special"],
                     "key_words": words, "key_word_spans": spans}
        maps[role] = cap.to_map(rows["tokens"], calls=calls, special=rows["special"],
                                words=rows.get("words"), word_spans=rows.get("word_spans"),
                                model=name, title=title, **extra)
    return maps


def _show(token: str) -> str:
    """A token as a person reads it: without the byte-level (``Ġ``) or SentencePiece
    (``▁``) word-start marks."""
    shown = token.replace("Ġ", "").replace("▁", "").replace("Ċ", "\\n")
    return shown or token


def _groups(paths: list[str]) -> dict[str, list[int]]:
    """Call indices grouped by module path with the layer numbers taken out, in order of
    first appearance (``decoder.layers.#.self_attn``, ``decoder.layers.#.encoder_attn``)."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        out.setdefault(re.sub(r"\.\d+(?=\.|$)", ".#", p), []).append(i)
    return out


def _roles(groups: dict[str, list[int]], enc_dec: bool) -> dict[str, list[int]]:
    if not enc_dec:
        if len(groups) != 1:
            raise ValueError(f"expected one kind of attention in this model; found "
                             f"{len(groups)}: {', '.join(groups)}")
        return {"self": next(iter(groups.values()))}
    enc = [g for g in groups if "encoder" in g.split(".#")[0]]
    dec = [g for g in groups if g not in enc]
    if len(enc) != 1 or len(dec) != 2:
        raise ValueError(f"expected encoder, decoder and cross-attention; found "
                         f"{', '.join(groups)}")
    # every decoder layer attends to itself first, then to the encoder
    return {"encoder": groups[enc[0]], "decoder": groups[dec[0]], "cross": groups[dec[1]]}
