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


@lru_cache(maxsize=1)
def float32_error() -> float:
    """What rounding to float32 alone costs the default sentence's weights: max |float32
    map - float64 map| of the same model. Two float32 computations of that map (another
    thread count, another implementation) each stay within 2x this error of the float64
    map (the low-precision rule of DESIGN.md), so they agree within 4x it."""
    import copy

    import numpy as np

    w64 = copy.deepcopy(model()).double().attend(SENTENCE).weights
    return float(np.abs(sentence_map().weights.astype(np.float64) - w64).max())
