"""Tiny randomly initialised Hugging Face models for the tests (built from configs; no
download), and a tokenizer.json for them."""

from __future__ import annotations

import torch

KINDS = ("bert", "gpt2", "llama", "mistral", "bart", "vit")
TEXT_KINDS = ("bert", "gpt2", "llama", "mistral", "bart")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "animal", "didn't", "cross", "street",
         "because", "it", "was", "too", "tired", "a", "cat", "sat", "on", "mat", "."]


def config(kind: str, impl: str = "sdpa"):
    import transformers as T

    c = dict(attn_implementation=impl)
    if kind == "bert":
        return T.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=2,
                            num_attention_heads=3, intermediate_size=32,
                            max_position_embeddings=64, **c)
    if kind == "gpt2":
        return T.GPT2Config(vocab_size=60, n_embd=24, n_layer=2, n_head=3, n_positions=64,
                            bos_token_id=2, eos_token_id=3, **c)
    if kind == "llama":  # GQA (4 query heads on 2 key heads) and rotary positions
        return T.LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                             max_position_embeddings=64, bos_token_id=2, eos_token_id=3, **c)
    if kind == "mistral":  # GQA and a sliding window shorter than the inputs
        return T.MistralConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=40, max_position_embeddings=64,
                               sliding_window=4, bos_token_id=2, eos_token_id=3, **c)
    if kind == "bart":  # encoder self-, decoder causal self- and cross-attention
        return T.BartConfig(vocab_size=60, d_model=24, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=3, decoder_attention_heads=3,
                            encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3,
                            decoder_start_token_id=2, forced_eos_token_id=None, **c)
    if kind == "vit":
        return T.ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=32, image_size=16, patch_size=4, num_channels=3,
                           **c)
    raise ValueError(kind)


def model(kind: str, impl: str = "sdpa", *, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    cls = {"bert": T.BertModel, "gpt2": T.GPT2Model, "llama": T.LlamaModel,
           "mistral": T.MistralModel, "bart": T.BartModel, "vit": T.ViTModel}[kind]
    return cls(config(kind, impl)).eval()


def inputs(kind: str, *, seed: int = 0) -> dict:
    """A padded batch of two (the second row ends in 3 pads: with Mistral's window of 4
    every query still sees a real key), or two images."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(4, 60, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "bart":
        out["decoder_input_ids"] = torch.randint(4, 60, (2, 6), generator=g)
    return out


def save_tokenizer(path) -> None:
    """A word-level tokenizer.json over :data:`VOCAB` (whitespace + punctuation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


def save(kind: str, path) -> None:
    """A model directory: config.json, model.safetensors and tokenizer.json."""
    model(kind).save_pretrained(str(path))
    save_tokenizer(path)
