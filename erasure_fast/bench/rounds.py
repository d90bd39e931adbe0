"""Interleaved timing: the providers of one (workload, shape, size) point run in rounds.

Each round starts with a matmul-rate probe of the same thread count (the machine's speed now), then
calls every provider once, in an order rotated by one each round (A B C, B C A, C A B, ...), so drift
on a shared machine lands on every provider alike instead of on whichever ran during it. A
provider's speedup over TransformerLens is the median of the per-round ratios t_TL / t_provider --
two calls minutes apart never make one ratio -- with its inter-quartile range as the spread.

Rounds continue until every provider's spread is within ``target_spread`` (relative inter-quartile
range of its per-round ratio, or of its time where there is no TransformerLens reference) after at
least ``min_rounds`` rounds ("converged"), or the point's ``budget_s`` is spent ("budget"), or
``max_rounds`` rounds ran ("max rounds"); the stop reason is recorded with the point.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from . import machine as mach


@dataclass(frozen=True)
class RoundSettings:
    min_rounds: int = 5
    max_rounds: int = 30
    target_spread: float = 0.10  # relative inter-quartile range of a provider's per-round ratio / time
    budget_s: float = 120.0  # wall time for one point's rounds


@dataclass
class RoundsResult:
    times: Dict[str, List[float]]  # per provider, one time per round it ran
    errors: Dict[str, str] = field(default_factory=dict)  # providers that failed in a round
    probes: List[float] = field(default_factory=list)  # matmul GFLOP/s at the start of each round
    rounds: int = 0
    stop: str = ""


def quartiles(values: List[float]) -> Tuple[float, float, float]:
    """(25 %, 50 %, 75 %) with linear interpolation (one value: that value thrice)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def relative_spread(values: List[float]) -> float:
    q1, med, q3 = quartiles(values)
    return (q3 - q1) / med if med else float("inf")


def per_round_ratios(reference: List[float], times: List[float]) -> List[float]:
    """t_reference / t_provider of every round both ran."""
    return [r / t for r, t in zip(reference, times) if t > 0]


def run_rounds(calls: Dict[str, Callable[[], object]], device, probe: Callable[[], float], settings: RoundSettings,
               reference: Optional[str] = None) -> RoundsResult:
    """Time ``calls`` in interleaved rounds (module docstring); ``reference`` names the provider the
    ratios are taken against (TransformerLens), if it is among ``calls``."""
    active = list(calls)
    res = RoundsResult(times={name: [] for name in calls})
    t_start = time.perf_counter()
    while True:
        r = res.rounds
        res.probes.append(probe())
        k = r % len(active) if active else 0
        for name in active[k:] + active[:k]:
            try:
                t0 = time.perf_counter()
                calls[name]()
                mach.sync(device)
                res.times[name].append(time.perf_counter() - t0)
            except Exception as e:  # recorded; the provider leaves the rounds
                res.errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
        active = [name for name in active if name not in res.errors]
        res.rounds += 1
        if res.rounds >= settings.min_rounds and _converged(res, active, reference, settings.target_spread):
            res.stop = "converged"
            break
        if time.perf_counter() - t_start >= settings.budget_s:
            res.stop = "budget"
            break
        if res.rounds >= settings.max_rounds or not active:
            res.stop = "max rounds" if active else "no provider left"
            break
    return res


def _converged(res: RoundsResult, active: List[str], reference: Optional[str], target: float) -> bool:
    ref = res.times.get(reference) if reference in active else None
    for name in active:
        if ref is not None and name != reference:
            spread = relative_spread(per_round_ratios(ref, res.times[name]))
        else:
            spread = relative_spread(res.times[name])
        if not spread <= target:
            return False
    return True
