"""Interleaved timing of a few variants of one call under three cache states, for A/B benchmarks
(benchmarks/ab_builds.py: two builds of the kernels; benchmarks/activation_checks.py: where the public
call checks its activations). A shared machine's speed drifts by tens of percent between runs, so
variants are compared within one run, their order alternating by round, by the median of the
per-round ratios."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Tuple

import torch

from .harness import trim_heap

#: "warm": the same call just before; "cold": a write of the flush tensor (more than the caches)
#: before each call, as the bench's rounds leave them; "trimmed": that write, then glibc's
#: malloc_trim(0), as other work's freed memory is given back (a fresh allocation faults in again)
CONDITIONS = ("warm", "cold", "trimmed")


def interleaved(calls: Dict[str, Callable[[], object]], rounds: int,
                flush: torch.Tensor) -> Dict[Tuple[str, str], List[float]]:
    """{(variant, condition): [seconds per round]} for each variant of ``calls`` and each of
    CONDITIONS; the variants' order alternates by round, and each variant's first call is left out."""
    names = list(calls)
    times = {(b, c): [] for b in names for c in CONDITIONS}
    for b in names:  # first calls (allocations, thread pools) out of the timing
        calls[b]()
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for cond in ("cold", "trimmed", "warm"):
            for b in order:
                if cond == "warm":
                    calls[b]()
                else:
                    flush.fill_(1.0)
                    if cond == "trimmed":
                        trim_heap()
                t0 = time.perf_counter()
                out = calls[b]()
                times[(b, cond)].append(time.perf_counter() - t0)
                del out
    return times
