"""The pretrained model the BERT/explain/viz tests share, loaded once per process."""

from __future__ import annotations

from functools import lru_cache

SENTENCE = "The animal didn't cross the street because it was too tired"


@lru_cache(maxsize=1)
def model():
    import qkv

    return qkv.load_pretrained()


@lru_cache(maxsize=1)
def sentence_map():
    """The default sentence's token-level AttentionMap (do not mutate)."""
    return model().attend(SENTENCE)
