import os
import random

import numpy as np
import pytest
import torch

from helpers import CPU_BACKENDS

# The suite is sized for 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def torch_settings() -> dict:
    """The process-wide torch settings a test (or the library code it calls) could change."""
    return {
        "threads": torch.get_num_threads(),
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "anomaly mode": torch.is_anomaly_enabled(),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.is_deterministic_algorithms_warn_only_enabled()),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
    }


def restore_torch_settings(s: dict) -> None:
    torch.set_num_threads(s["threads"])
    torch.set_default_dtype(s["default dtype"])
    torch.set_grad_enabled(s["grad mode"])
    torch.autograd.set_detect_anomaly(s["anomaly mode"])
    on, warn_only = s["deterministic algorithms"]
    torch.use_deterministic_algorithms(on, warn_only=warn_only)
    torch.set_float32_matmul_precision(s["float32 matmul precision"])


@pytest.fixture(autouse=True)
def isolated_torch_state():
    """Make every test independent of the order the suite runs in.

    Before a test: the global random generators (torch, NumPy, ``random``) start from one
    fixed seed, so a test that draws from them sees the same numbers wherever it runs.
    After it: the generators are put back, and a test that leaves a torch setting changed
    (thread count, default dtype, grad mode, deterministic algorithms, ...) fails with the
    setting named -- after the setting is restored, so later tests are unaffected.
    """
    before = torch_settings()
    saved_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_rng_state(saved_rng[0])
    np.random.set_state(saved_rng[1])
    random.setstate(saved_rng[2])
    after = torch_settings()
    if after != before:
        restore_torch_settings(before)
        changed = ", ".join(f"{k} {before[k]} -> {after[k]}"
                            for k in before if before[k] != after[k])
        pytest.fail(f"the test changed global torch state and did not restore it: {changed}",
                    pytrace=False)


def pytest_terminal_summary(terminalreporter, config):
    """Print the shuffle's seed (pytest -q hides the header that names it)."""
    if not config.pluginmanager.hasplugin("random_order"):
        return
    from random_order.config import Config

    order = Config(config)
    if order.is_enabled and order.bucket_type != "none":
        terminalreporter.write_line(
            f"random order: {order.bucket_type} buckets, seed {order.seed} (run this order "
            f"again with --random-order-seed={order.seed}; keep file order with "
            "--random-order-bucket=none)")
