import os

import pytest
import torch

import qkv

# The suite is sized for 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: Backends that run on CPU tensors here (the Triton kernels have their own test file,
#: run under the interpreter).
CPU_BACKENDS = [name for name in qkv.backends() if name != "triton"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param
