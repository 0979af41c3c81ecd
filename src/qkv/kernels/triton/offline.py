"""Compile the kernels for a GPU that is not here: registers, spills, shared memory, MMA kind.

Triton compiles for any CUDA target on a CPU-only machine (the ``ptxas`` it ships does the
last step). Inside :func:`compiling`, every launch of qkv's launch code (the same
``forward``/``backward``/``attention_weights`` a real call runs, fed ``meta`` tensors that
carry shapes and strides but no memory) compiles the kernel for ``arch`` instead of
running it, with the arguments a real call would pass, so the specialisation (constexprs,
16-byte divisibility of pointers and strides, stride-1 dims) is the real one; and the
autotuner compiles every candidate instead of timing them. Each compile becomes a
:class:`Compiled` record (read off ``ptxas -v`` and the PTX).

Works the same with a GPU present: the real driver is set aside while compiling.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

__all__ = ["Compiled", "active", "compiling", "shared_memory_limit"]

#: Bytes of shared memory one block may use (the opt-in maximum per block).
_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                 100: 227 * 1024, 120: 99 * 1024}


def shared_memory_limit(arch: int) -> int:
    """The most shared memory one block can have on compute capability ``arch`` (e.g. 90)."""
    return _SHARED_LIMIT.get(arch, 99 * 1024 if arch % 10 else 163 * 1024)


@dataclass
class Compiled:
    """What one compile of one kernel for one target produced."""

    kernel: str
    arch: int
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    wgmma: int = 0  # wgmma.mma_async instructions in the PTX (Hopper's warpgroup MMA)
    mma_sync: int = 0  # mma.sync instructions (Ampere-style MMA)
    tma: int = 0  # cp.async.bulk.tensor instructions (TMA loads/stores)
    tcgen05: int = 0  # tcgen05.mma instructions (Blackwell's tensor-memory MMA)
    error: str | None = None
    ttir: str = field(default="", repr=False)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared <= shared_memory_limit(self.arch)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("ttir")
        return d


class _Driver:
    """Enough of a Triton driver for compiling: the target, a device id (the arch, so that
    Triton's per-device caches keep targets apart) and a stream that is never used."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")


class _Recorder:
    def __init__(self, arch: int, keep_ttir: bool, first_only: bool):
        self.arch = arch
        self.keep_ttir = keep_ttir
        self.first_only = first_only
        self.records: dict[tuple, Compiled] = {}

    def compile(self, kernel, grid, args, kwargs) -> None:
        from triton import knobs

        constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        key = (name, tuple(sorted(constexprs.items())), kwargs.get("num_warps"),
               kwargs.get("num_stages"), tuple(_spec(a) for a in args))
        if key in self.records:
            return
        rec = Compiled(name, self.arch, constexprs, kwargs.get("num_warps", 4),
                       kwargs.get("num_stages", 3))
        log = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            try:
                ck = kernel.warmup(*args, grid=grid, **kwargs)
            except Exception as exc:  # reported as a row, not raised: one config failing is data
                rec.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                self.records[key] = rec
                return
        _read_ptxas_log(rec, log.getvalue())  # always_compile: never a silent cache hit
        rec.shared = int(ck.metadata.shared)
        ptx = ck.asm["ptx"]
        rec.wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
        rec.mma_sync = len(re.findall(r"\bmma\.sync", ptx))
        rec.tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
        rec.tcgen05 = len(re.findall(r"\btcgen05\.mma", ptx))
        if self.keep_ttir:
            rec.ttir = ck.asm["ttir"]
        self.records[key] = rec


def _spec(arg):
    """What of a launch argument changes the compiled code: dtype and strides, or the value."""
    if hasattr(arg, "stride"):
        return (str(arg.dtype), tuple(arg.stride()))
    return arg if isinstance(arg, (int, float, bool, type(None))) else type(arg).__name__


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _read_ptxas_log(rec: Compiled, log: str) -> None:
    for attr, pattern in _PTXAS.items():
        m = pattern.search(log)
        if m:
            setattr(rec, attr, int(m.group(1)))


_active: _Recorder | None = None


def active() -> _Recorder | None:
    """The recorder while :func:`compiling` is on, else None."""
    return _active


@contextlib.contextmanager
def compiling(arch: int, *, keep_ttir: bool = False,
              first_only: bool = False) -> Iterator[dict[tuple, Compiled]]:
    """Inside the block, launches compile for compute capability ``arch`` (80, 90, 100...)
    instead of running; yields the records (filled as the block runs). ``first_only``:
    only the autotuner's first candidate of each kernel; ``keep_ttir``: keep each TTIR.

    The launch code sees CUDA-free ``meta`` tensors; Triton sees a driver that only knows
    the target. Nothing runs on a device, and a GPU present is left alone.
    """
    global _active
    from triton import knobs
    from triton.runtime.driver import driver

    if _active is not None:
        raise RuntimeError("offline.compiling() does not nest")
    rec = _Recorder(arch, keep_ttir, first_only)
    before = driver._active  # None until something asked for the real driver
    driver.set_active(_Driver(arch))
    _active = rec
    try:
        with knobs.compilation.scope():
            knobs.compilation.always_compile = True  # a fresh ptxas log for every compile
            yield rec.records
    finally:
        _active = None
        driver._active = before
