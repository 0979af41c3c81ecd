"""Memory checks made before anything is allocated: a size that cannot fit is refused
with a ValueError that says what fits, instead of a MemoryError (or the machine swapping)
halfway through building a model."""

from __future__ import annotations

import os

import torch

__all__ = ["available_bytes", "check_fits", "gib"]


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` (MemAvailable of the host for CPU); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def gib(n: float) -> str:
    """``n`` bytes in GiB, one decimal."""
    return f"{n / 2**30:.1f} GiB"


def check_fits(cfg, vocab_size: int, max_len: int, *,
               device: torch.device | str = "cpu", world: int = 1) -> None:
    """``cfg`` is a :class:`~qkv.train.TrainConfig`. ValueError before anything is
    allocated when the model (weights, gradients, AdamW
    moments) and one step's activations of ``batch_size / world`` examples cannot fit in
    the memory ``device`` has free; the message says what fits. The estimate is generous
    (it refuses only what cannot work), ``max_len`` is the longest sequence in tokens."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    m = cfg.model
    d, ff, h = m.d_model, m.ff_dim, m.num_heads
    layers = m.encoder_layers + 2 * m.decoder_layers  # a decoder layer attends twice
    params = 2 * vocab_size * d + (m.encoder_layers + m.decoder_layers) * (2 * d * ff) \
        + layers * 4 * d * d
    fixed = 16 * params  # float32 weights, gradients and two AdamW moments
    per_example = 4 * layers * max_len * (12 * d + 2 * ff + 3 * h * max_len) \
        + 8 * max_len * vocab_size + 400  # + logits and their gradient, the example's text
    per_rank = -(-cfg.batch_size // world)
    need = fixed + per_example * per_rank + 400 * cfg.eval_size
    free = available_bytes(device)
    if free is None or need <= free:
        return
    if fixed > free:
        raise ValueError(f"the model does not fit: d_model={d} with ff_dim={ff} and "
                         f"{m.encoder_layers}+{m.decoder_layers} layers has {params:,} "
                         f"parameters, which need about {gib(fixed)} with their gradients "
                         f"and optimizer state, but {device.type} has {gib(free)} free; use "
                         "a smaller d_model= or ff_dim=, or fewer layers")
    fits = max(0, (free - fixed - 400 * cfg.eval_size) // per_example) * world
    if 400 * cfg.eval_size > free - fixed:
        raise ValueError(f"eval_size={cfg.eval_size} validation examples do not fit in the "
                         f"{gib(free)} free; use at most eval_size="
                         f"{max(1, (free - fixed) // 800)}")
    raise ValueError(f"batch_size={cfg.batch_size} does not fit: one step needs about "
                     f"{gib(need)} but {device.type} has {gib(free)} free; use at most "
                     f"batch_size={max(1, fits)}")
