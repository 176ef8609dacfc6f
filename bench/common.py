"""Timing and ceiling helpers shared by the kernel benchmarks (CUDA only).

Every benchmark times repeated runs after warm-up and reports their min / median / max (a :class:`Timing`), next to
a plain-PyTorch baseline timed in the same process and the card's measured ceilings (device copy bandwidth, bf16
GEMM rate); rates and speedups use the medians.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One line of the kernel benchmark table."""

    op: str
    shape: str
    ours_ms: float  # a Timing (median_ms / graph_ms), or a plain median
    base_ms: float
    base_name: str
    unit: str  # "GB/s" or "TFLOP/s"
    work: float  # bytes or FLOPs of one call, so rate = work / time
    ceiling: float  # the card's measured ceiling in `unit`

    @property
    def rate(self) -> float:
        scale = 1e9 if self.unit == "GB/s" else 1e12
        return self.work / (self.ours_ms * 1e-3) / scale

    @property
    def speedup(self) -> float:
        return self.base_ms / self.ours_ms


class Timing(float):
    """Milliseconds of a timed run: a float equal to the median (so rates and ratios use it), with the fastest
    (``lo``) and slowest (``hi``) repetition attached."""

    lo: float
    hi: float

    def __new__(cls, times_ms) -> Timing:
        times = sorted(float(t) for t in times_ms)
        if not times:
            raise ValueError("Timing needs at least one time")
        timing = super().__new__(cls, statistics.median(times))
        timing.lo, timing.hi = times[0], times[-1]
        return timing

    def spread(self, digits: int = 4) -> str:
        """``min / median / max``, as the tables print it."""
        return f"{self.lo:.{digits}f} / {float(self):.{digits}f} / {self.hi:.{digits}f}"


def median_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 200) -> Timing:
    """Time ``fn()`` (CUDA events, L2 flushed between runs: triton's do_bench): the median milliseconds, with the
    run's min and max attached."""
    import triton.testing

    return Timing(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))


def graph_replay(fn):
    """Capture ``fn`` in a CUDA graph after a warm-up call (which compiles and autotunes); return the replay.

    Timing the replay leaves host launch overhead out of both sides of a comparison.
    """
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def graph_ms(fn) -> Timing:
    """:func:`median_ms` of ``fn`` replayed from a CUDA graph."""
    return median_ms(graph_replay(fn))


def synced(fn):
    """``fn`` followed by a device synchronisation, for host-inclusive pytest-benchmark timings."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextlib.contextmanager
def attention_path(path: str):
    """RAS_ATTENTION set to ``path`` inside the block (the op reads it at each launch; a CUDA graph keeps the path
    it captured), the caller's value (or its absence) restored after."""
    before = os.environ.get("RAS_ATTENTION")
    os.environ["RAS_ATTENTION"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAS_ATTENTION"]
        else:
            os.environ["RAS_ATTENTION"] = before


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype a ``--dtype`` option names; by default bf16 on a GPU, fp32 on the CPU."""
    return DTYPES[name or ("bf16" if device.type == "cuda" else "fp32")]


def device_name() -> str:
    return torch.cuda.get_device_name()


def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (GB/s, read + write) and bf16 GEMM rate (TFLOP/s) on random data."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = median_ms(lambda: a @ b)
    return {
        "GB/s": 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9,
        "TFLOP/s": 2 * 8192**3 / (gemm_ms * 1e-3) / 1e12,
    }


def print_header(ceilings: dict[str, float]) -> None:
    """The card, the versions and the same-run ceilings, printed above a benchmark's table."""
    import triton

    print(f"{device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"ceilings: device copy {ceilings['GB/s']:.0f} GB/s, bf16 GEMM {ceilings['TFLOP/s']:.0f} TFLOP/s\n")


def _ms(t: float) -> str:
    return t.spread() if isinstance(t, Timing) else f"{t:.4f}"


def format_table(rows: list[Row]) -> str:
    """A markdown table: op, shape, ours and the baseline (min / median / max ms), the speedup, the achieved rate and
    its share of the ceiling (of the medians)."""
    lines = [
        "| op | shape | ours ms min / median / max | baseline | baseline ms min / median / max | speedup | achieved "
        "| % of ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.shape} | {_ms(r.ours_ms)} | {r.base_name} | {_ms(r.base_ms)} | {r.speedup:.2f}x | "
            f"{r.rate:.0f} {r.unit} | {100 * r.rate / r.ceiling:.0f}% |"
        )
    return "\n".join(lines)
