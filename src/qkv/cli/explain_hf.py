"""``qkv explain --model DIR``, for a Hugging Face model directory that is not a BERT.

The model runs in ``transformers`` on its SDPA path under :func:`qkv.capture`
(:mod:`qkv.models.hf`); the map shown is its self-attention, or for an encoder-decoder the
cross-attention (decoder tokens as rows, the encoder's as columns).
"""

from __future__ import annotations

import os


def is_hf_dir(model: str) -> bool:
    """True when ``--model`` names a Hugging Face directory qkv's own BERT does not read."""
    from ..models.hf import is_hf_dir as check

    return os.path.isdir(os.path.expanduser(model)) and check(model)


def attend(model: str, text: str, pair: str | None, *, strict: bool):
    """The AttentionMap that ``qkv explain`` shows for this model directory."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from ..models import hf

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass  # hf.attend says how to install transformers
    try:
        maps = hf.attend(model, text, pair, strict=strict)
    except ImportError as e:  # no transformers: a one-line error, not a traceback
        raise ValueError(str(e)) from None
    return maps.get("cross") or maps["self"]
