"""This machine's fp32 matrix-multiply peak: the best rate over several square sizes, measured for
both BLAS libraries at hand, torch (MKL / oneDNN) and numpy (its own BLAS, usually OpenBLAS),
named. Every benchmark here reports its FLOP rate against this peak (a single small product, such
as one 1024^3 ``torch.mm``, understates it several-fold). The bf16 rate of ``torch.mm`` is reported
beside it: on CPUs with AMX it is what the screened exact search runs at.

    python benchmarks/matmul_peak.py
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SIZES = (1024, 2048, 3072, 4096)


def numpy_blas() -> str:
    """The BLAS library numpy links, by name (``numpy`` when it cannot tell)."""
    try:
        config = np.show_config(mode="dicts")  # numpy >= 1.25
        return str(config["Build Dependencies"]["blas"]["name"])
    except Exception:  # noqa: BLE001 - older numpy or a build without the record
        return "numpy"


def best_rate(product: Callable[[], Any], flops: float, trials: int) -> float:
    """FLOP/s of the fastest of ``trials`` runs, after one warm-up."""
    product()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return flops / best


def matmul_peak(sizes: tuple[int, ...] = SIZES, trials: int = 3) -> dict[str, Any]:
    """``{"peak_gflops", "peak_by", "rates": {library: {size: GFLOP/s}}}``: the best fp32 rate over
    ``sizes`` for torch and numpy, and which library and size reached it. bf16 torch rates are in
    ``rates`` too but not in the fp32 peak."""
    rates: dict[str, dict[int, float]] = {"torch fp32 (MKL/oneDNN)": {}, f"numpy fp32 ({numpy_blas()})": {},
                                          "torch bf16 (oneDNN)": {}}
    for n in sizes:
        flops = 2.0 * n ** 3
        a, b = torch.randn(n, n), torch.randn(n, n)
        ta, tb = list(rates)[:2]
        an, bn, ah, bh = a.numpy(), b.numpy(), a.bfloat16(), b.bfloat16()
        rates[ta][n] = best_rate(functools.partial(torch.mm, a, b), flops, trials) / 1e9
        rates[tb][n] = best_rate(functools.partial(np.matmul, an, bn), flops, trials) / 1e9
        rates["torch bf16 (oneDNN)"][n] = best_rate(functools.partial(torch.mm, ah, bh), flops, trials) / 1e9
    fp32 = [(rate, f"{lib} at {n}^3") for lib in list(rates)[:2] for n, rate in rates[lib].items()]
    peak, by = max(fp32)
    return {"peak_gflops": peak, "peak_by": by, "rates": rates}


def describe(peak: dict[str, Any]) -> str:
    """A markdown table of the rates and a line naming the peak."""
    sizes = sorted({n for r in peak["rates"].values() for n in r})
    lines = ["| library | " + " | ".join(f"{n}^3" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for lib, by_size in peak["rates"].items():
        lines.append(f"| {lib} | " + " | ".join(f"{by_size[n]:.0f}" for n in sizes) + " |")
    lines.append(f"fp32 matmul peak: {peak['peak_gflops']:.0f} GFLOP/s ({peak['peak_by']}), "
                 f"{torch.get_num_threads()} torch threads")
    return "\n".join(lines)


if __name__ == "__main__":
    print("GFLOP/s, best of 3 runs per size")
    print(describe(matmul_peak()))
