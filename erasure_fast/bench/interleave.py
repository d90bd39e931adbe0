"""Interleaved timing of a few variants of one call under three cache states, for A/B benchmarks
(benchmarks/ab_builds.py: two builds of the kernels; benchmarks/activation_checks.py: where the public
call checks its activations and outputs). A shared machine's speed drifts by tens of percent between runs, so
variants are compared within one run, their order alternating by round, by the median of the
per-round ratios."""

from __future__ import annotations

import os
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


#: the workloads and dtypes of the A/B scripts (GELU-4L shape, `workloads.random_weight_args`)
AB_WORKLOADS = ("K1", "K2n", "K2f")
AB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_ab_arguments(parser) -> None:
    """The options every A/B script takes: tokens, rounds, workloads, dtypes, flush size, output file."""
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--workloads", default=",".join(AB_WORKLOADS))
    parser.add_argument("--dtypes", default=",".join(AB_DTYPES))
    parser.add_argument("--flush-mib", type=int, default=512, help="written before each cold call (more than the caches)")
    parser.add_argument("--out", default=None, help="markdown file for the table (default: print only)")


def run_ab(args, *, heading: str, what: str, command: str, labels: Tuple[str, str],
           calls_for: Callable[[str, torch.dtype], Dict[str, Callable[[], object]]]) -> str:
    """The A/B table of an A/B script: for each workload and dtype of ``args`` (`add_ab_arguments`),
    the two variants ``calls_for(workload, dtype)`` (keyed by ``labels``: before, after) timed by
    `interleaved`; time = median, ratio = median of the per-round ratios after / before. Printed row
    by row, written to ``args.out`` when given, and returned. ``what`` says what the ratio compares."""
    import numpy as np

    from . import machine

    wanted, dtypes = args.workloads.split(","), args.dtypes.split(",")
    bad = [w for w in wanted if w not in AB_WORKLOADS] + [d for d in dtypes if d not in AB_DTYPES]
    if bad:
        raise SystemExit(f"--workloads / --dtypes: unknown {bad} (workloads {list(AB_WORKLOADS)}, "
                         f"dtypes {list(AB_DTYPES)})")
    flush = torch.empty(args.flush_mib * 2**20 // 4)
    info = machine.describe()
    before, after = labels
    lines = [f"# {heading} ({info['cpu']})", "",
             f"{machine.cpu_line(info)}; GELU-4L shape, {args.tokens:,} tokens, {args.rounds} rounds (the variants'"
             f" order alternating); time = median; ratio = median of the per-round ratios {what}.", "",
             f"Command: `{command} --tokens {args.tokens} --rounds {args.rounds} --workloads {args.workloads}"
             f" --dtypes {args.dtypes} --flush-mib {args.flush_mib}`", "",
             f"| workload | dtype | caches | {before} ms | {after} ms | time {after} / {before} (< 1: faster) |",
             "|---|---|---|---:|---:|---:|"]
    for w in wanted:
        for dname in dtypes:
            t = interleaved(calls_for(w, AB_DTYPES[dname]), args.rounds, flush)
            for cond in CONDITIONS:
                o, n = np.array(t[(before, cond)]), np.array(t[(after, cond)])
                lines.append(f"| {w} | {dname} | {cond} | {np.median(o) * 1e3:.2f} | {np.median(n) * 1e3:.2f} |"
                             f" {np.median(n / o):.3f} |")
            print(*lines[-len(CONDITIONS):], sep="\n", flush=True)
    return save_table(lines, args.out)


def save_table(lines, out) -> str:
    """``lines`` as one text, written to the file ``out`` (its folder made) when given; returned."""
    text = "\n".join(lines) + "\n"
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
    return text
