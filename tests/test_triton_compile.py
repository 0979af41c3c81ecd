"""The Triton kernels compiled for sm_90 without a GPU: the code a real launch would get.

``offline.compiling(90)`` runs qkv's own launch code on ``meta`` tensors and compiles each
kernel for Hopper instead of launching it (Triton and the ptxas bundled with it need no
GPU). Checked here on the generated code itself, which the interpreter cannot show:

* 64-bit row offsets: no int32 product of a row index and a stride (or a length) in the
  TTIR, where ``L * stride`` can pass 2**31; a deliberately wrong kernel shows the check
  catches the pattern;
* sm_90 gets warpgroup MMAs (wgmma), and nothing spills.

``benchmarks/gpu_compile.py`` covers every candidate, head dim, dtype and band.
"""

import re

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from qkv.kernels.triton import offline
from qkv.kernels.triton.bwd import backward
from qkv.kernels.triton.fwd import forward
from qkv.kernels.triton.weights import attention_weights

pytestmark = pytest.mark.filterwarnings("ignore:.*FP_FUSION")  # Triton 3.9's notice

#: Ops that keep a value's magnitude (a broadcast copy, a sign extension).
_SAME = ("tt.splat", "tt.broadcast", "tt.expand_dims", "arith.extsi", "arith.extui")
_DEF = re.compile(r"^\s*(%[\w.#]+) = ([\w.]+) ?(.*?)(?: loc\(|$)")
#: Scalars whose product with a row index is a row offset: strides and lengths.
_OFFSET_ARGS = re.compile(r"^%(stride_\w+|LQ|LK)$")


def int32_row_offsets(ttir: str) -> list[str]:
    """The ``arith.muli`` of 32-bit ints in ``ttir`` that multiply a stride (or a length)
    by something not bounded by a tile (an ``arange`` or a constant): a row offset that
    overflows once ``L * stride >= 2**31``."""
    scopes: list[dict] = [{}]

    def lookup(name):
        for scope in reversed(scopes):
            if name in scope:
                return scope[name]
        return None  # a function or block argument

    def root(name):
        d = lookup(name)
        while d is not None and d[0] in _SAME:
            name = d[1][0]
            d = lookup(name)
        return name, d

    def bounded(name):
        _, d = root(name)
        return d is not None and d[0] in ("tt.make_range", "arith.constant")

    def offset_arg(name):
        n, d = root(name)
        return d is None and _OFFSET_ARGS.match(n) is not None

    bad = []
    for line in ttir.splitlines():
        stripped = line.strip()
        if stripped.startswith("}"):
            scopes.pop()
        m = _DEF.match(line)
        if m:
            name, op, rest = m.groups()
            operands = re.findall(r"%[\w.#]+", rest.split(":")[0])
            scopes[-1][name] = (op, operands)
            i32 = re.search(r":\s*(i32|tensor<[^>]*xi32>)\s*$", rest.strip())
            if op == "arith.muli" and i32 and len(operands) == 2:
                a, b = operands
                if (offset_arg(a) and not bounded(b)) or (offset_arg(b) and not bounded(a)):
                    bad.append(stripped)
        if stripped.endswith("{"):
            scopes.append({})
    return bad


@pytest.fixture(scope="module")
def sm90():
    """Every kernel of a causal GQA call (forward, fused and deterministic backward,
    weights) compiled for sm_90, bf16, D=128, first autotune candidate each."""
    q = torch.empty(2, 4, 4096, 128, device="meta", dtype=torch.bfloat16)  # (B, Hq, L, D)
    k = torch.empty(2, 2, 4096, 128, device="meta", dtype=torch.bfloat16)  # (B, Hkv, L, D)
    with offline.compiling(90, keep_ttir=True, first_only=True) as records:
        out, lse = forward(q, k, k, None, 0.1, 256, 0)
        for deterministic in (False, True):
            backward(torch.empty_like(out), q, k, k, out, lse, None, 0.1, 256, 0,
                     deterministic=deterministic)
        attention_weights(q, k, lse, None, 0.1, 256, 0)
    return {r.kernel + ("" if r.constexprs.get("FUSE_DQ", True) else "/deterministic"): r
            for r in records.values()}


def test_every_kernel_compiles_for_sm90_with_wgmma_and_no_spills(sm90):
    assert set(sm90) == {"_fwd_kernel", "_delta_kernel", "_dkdv_kernel",
                         "_dkdv_kernel/deterministic", "_dq_kernel", "_weights_kernel"}
    for name, rec in sm90.items():
        assert rec.error is None, f"{name}: {rec.error}"
        assert 0 < rec.registers <= 255, name
        assert (rec.spill_stores, rec.spill_loads) == (0, 0), f"{name} spills: {rec}"
        assert rec.shared <= offline.shared_memory_limit(90), name
        if name != "_delta_kernel":  # the only kernel without a matmul
            assert rec.wgmma > 0, f"{name} has no wgmma: {rec}"


def test_row_offsets_are_64_bit(sm90):
    for name, rec in sm90.items():
        assert "tt.func" in rec.ttir
        assert int32_row_offsets(rec.ttir) == [], f"{name}: int32 row offsets"


@triton.jit
def _int32_offsets(X, Y, n_rows, stride_xm, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + rows * stride_xm, mask=rows < n_rows)  # the pattern the check forbids
    tl.store(Y + tl.arange(0, BLOCK), x)


def test_the_offset_check_catches_an_int32_row_offset():
    x = torch.empty(1 << 16, device="meta", dtype=torch.float16)
    with offline.compiling(90, keep_ttir=True) as records:
        offline.active().compile(_int32_offsets, (1,), (x, x, 100, 3 * 64), {"BLOCK": 64})
    rec, = records.values()
    bad = int32_row_offsets(rec.ttir)
    assert len(bad) == 1 and "arith.muli %rows" in bad[0]  # (start + arange) * stride
