"""``auto``'s rule on a CUDA device (``kernels.triton_first``), asked of CPU calls: the rule
reads the call's dtype, mask, lengths and gradients, never its device."""

import pytest
import torch

import qkv
from qkv import kernels
from qkv.functional import prepare_call

from helpers import rand_qkv


def call_of(q, k, v, **kw):
    return prepare_call(q, k, v, **kw)[0]


@pytest.fixture
def long():
    n = kernels.TRITON_MIN_LENGTH
    return rand_qkv(1, 1, 1, n, n, 16, dtype=torch.bfloat16)


def test_long_inference_calls_go_to_the_fused_kernel_first(long):
    assert "no gradients" in kernels.triton_first(call_of(*long))
    assert "no gradients" in kernels.triton_first(call_of(*long, causal=True))


def test_training_calls_and_short_calls_go_to_sdpa_first(long):
    q, k, v = (t.requires_grad_() for t in long)
    assert kernels.triton_first(call_of(q, k, v)) is None
    with torch.no_grad():
        assert kernels.triton_first(call_of(q, k, v)) is not None
    short = rand_qkv(2, 4, 4, 1, kernels.TRITON_MIN_LENGTH - 1, 16, dtype=torch.bfloat16)
    assert kernels.triton_first(call_of(*short)) is None  # a decoding step


def test_a_band_sdpa_needs_a_dense_mask_for_goes_to_the_fused_kernel():
    q, k, v = rand_qkv(2, 2, 2, 5, 9, 16, dtype=torch.float16, requires_grad=True)
    assert kernels.triton_first(call_of(q, k, v)) is None
    for kw in ({"window": 3}, {"causal": True},  # causal with Lq != Lk: bottom-right
               {"mask": qkv.padding_mask(torch.tensor([9, 4]), 9)}):
        assert "dense" in kernels.triton_first(call_of(q, k, v, **kw)), kw


def test_float32_goes_to_the_tf32_kernel_only_where_torch_allows_tf32():
    q, k, v = rand_qkv(1, 2, 2, 5, 9, 16, dtype=torch.float32)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kernels.triton_first(call_of(q, k, v, window=3)) is None
        torch.set_float32_matmul_precision("high")
        assert "dense" in kernels.triton_first(call_of(q, k, v, window=3))
    finally:
        torch.set_float32_matmul_precision(before)


def test_cpu_calls_never_list_the_fused_kernel():
    q, k, v = rand_qkv(1, 2, 2, 5, 9, 16, dtype=torch.float16)
    assert "triton" not in [name for name, _ in kernels.auto_order(call_of(q, k, v))]
