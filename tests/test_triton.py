"""The Triton backend on CPU: its kernel tests (``tests/triton_cases.py``) in a child process.

Triton picks its interpreter when ``triton`` and the kernels are *defined* (import time),
and this session imported both already, through qkv, without ``TRITON_INTERPRET``. So the
cases run in a fresh process started with ``TRITON_INTERPRET=1``, where every kernel runs
on CPU tensors; the variable never leaks into this process. Skipped when Triton is absent.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("triton_cases.py")


def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-o", "addopts=", "-q", "-p",
         "no:cacheprovider", "--durations=3"],
        cwd=CASES.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"triton cases failed under the interpreter:\n{report}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, report


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter on")
def test_cpu_tensors_without_the_interpreter_are_refused():
    import torch

    import qkv

    q = torch.randn(1, 2, 3, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot do this call.*cpu tensors"):
        qkv.attention(q, q, q, backend="triton")
    assert qkv.attention(q, q, q).shape == (1, 2, 3, 16)  # auto falls back
