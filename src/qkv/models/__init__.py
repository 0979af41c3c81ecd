"""Pretrained Transformers built from qkv's layers: :mod:`qkv.models.bert`."""

from __future__ import annotations

from .bert import BertConfig, BertEncoder, BertEncoderOutput
from .loading import DEFAULT_MODEL, load_pretrained

__all__ = ["DEFAULT_MODEL", "BertConfig", "BertEncoder", "BertEncoderOutput", "load_pretrained"]
