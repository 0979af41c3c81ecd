import os

import pytest
import torch

from helpers import CPU_BACKENDS

# The suite is sized for 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param
