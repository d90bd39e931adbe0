"""Benchmark harness (`erasure-fast bench`): workloads K1, K2, S1 for every provider, roofline, report."""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch

from . import harness, machine, report
from .workloads import SHAPES

CPU_SIZES = [1024, 4096, 8192, 16384, 65536]
GPU_SIZES = [1024, 8192, 65536, 262144, 1048576]


def _cap_address_space(fraction: float = 0.85) -> None:
    """Cap the process's address space below physical memory so a provider that would exhaust RAM
    gets a MemoryError (recorded as "oom") instead of the kernel's OOM killer ending the whole run."""
    import resource

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    limit = int(total * fraction)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def run(out_dir: str = "benchmarks/results", *, device: str = None, shapes=("gelu-4l", "gpt2-small"), sizes=None,
        repeats: int = 5, budget_s: float = 60.0, s1_tokens: int = 0, providers=None, command: str = "") -> dict:
    """Run the benchmark and write the report; returns {"meta", "results", "files"}."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        _cap_address_space()
    sizes = list(sizes or (GPU_SIZES if dev.type == "cuda" else CPU_SIZES))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    info = machine.describe()
    roof = machine.roofline(dev)
    print(f"machine: {info.get('gpu') or info['cpu']}; roofline {roof}", flush=True)
    points: list = []
    partial = os.path.join(out_dir, "partial-results.json")
    os.makedirs(out_dir, exist_ok=True)

    def progress(line: str) -> None:  # a crash or kill mid-run keeps what was measured so far
        print(line, flush=True)
        with open(partial, "w") as f:
            json.dump(harness.as_records(points), f)

    harness.run_kernels(shapes, sizes, dev, repeats, budget_s, providers=providers, progress=progress, points=points)
    if s1_tokens:
        harness.run_s1(s1_tokens, dev, progress=progress, points=points)
    harness.finish(points, roof)
    meta = dict(machine=info, label=machine.machine_label(info), date=datetime.date.today().isoformat(), roofline=roof,
                repeats=repeats, sizes=sizes, shapes=list(shapes), command=command or " ".join(sys.argv))
    records = harness.as_records(points)
    files = report.write(out_dir, meta, records)
    if os.path.exists(partial):
        os.remove(partial)
    return dict(meta=meta, results=records, files=files)
