"""The benchmark's own process: ``python -m erasure_fast.bench SETTINGS_JSON`` (started by `bench.run`).

Everything that changes process-wide state lives here and nowhere else: the address-space cap (so a
provider that would exhaust RAM gets a MemoryError, recorded as "oom", instead of the kernel's OOM
killer ending the whole run -- or lowering the limit of whoever called `bench.run`), the extra shape
definitions, and the roofline's TF32 switch. The settings are the JSON object `bench.run` builds from
its (already validated) arguments; the child runs the harness, writes the report into ``out_dir`` and
the report's file paths into ``manifest``, which the parent reads back.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Optional

import torch

from . import harness, machine, report, rounds
from .workloads import SHAPES

# Fraction of physical memory the child's address space is capped at (CPU runs; CUDA reserves huge
# virtual ranges, so a cap there would break the device, not catch an OOM).
ADDRESS_SPACE_FRACTION = 0.85


def cap_address_space(fraction: float = ADDRESS_SPACE_FRACTION) -> Optional[int]:
    """Lower this process's RLIMIT_AS to ``fraction`` of physical memory (never raise it); returns the
    limit in bytes now in force (None: unlimited or unknown). Only the benchmark's child calls this."""
    import resource

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    limit = int(total * fraction)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft


# A run is marked disturbed when, within one point, the matmul probes differ by more than this
# fraction of their best (the machine's speed changed while providers were being compared), or when
# other processes kept more than this share of the CPUs busy during an idle second at the start or
# at the end (the load average is recorded too, but it lags: it still counts a run that just ended).
PROBE_SPREAD_LIMIT = 0.20
BUSY_LIMIT = 0.25


def disturbance(probes: list, before: dict, after: dict) -> dict:
    """Whether the run was disturbed, and why (see PROBE_SPREAD_LIMIT, START_LOAD_LIMIT)."""
    spreads = [(max(p["gflops"]) - min(p["gflops"])) / max(p["gflops"]) for p in probes if p["gflops"]]
    worst = max(spreads, default=0.0)
    reasons = []
    if worst > PROBE_SPREAD_LIMIT:
        reasons.append(f"matmul probes within a point differed by up to {100 * worst:.0f} % (limit {100 * PROBE_SPREAD_LIMIT:.0f} %)")
    for when, c in (("start", before), ("end", after)):
        busy = c.get("busy_fraction")
        if busy is not None and busy > BUSY_LIMIT:
            reasons.append(f"other processes used {100 * busy:.0f} % of the CPUs at the {when} (limit {100 * BUSY_LIMIT:.0f} %)")
    return dict(disturbed=bool(reasons), reasons=reasons, worst_probe_spread=worst)


def measure_and_report(settings: dict, address_space_cap: Optional[int] = None) -> dict:
    """Run every requested workload and write the report; returns {"meta", "results", "files"}."""
    dev = torch.device(settings["device"])
    out_dir = settings["out_dir"]
    info = machine.describe()
    before = machine.conditions(settings.get("origin_cwd"))
    kernel_dtype = getattr(torch, settings.get("dtype", "float32"))
    roof = machine.roofline(dev, extra_dtypes=(kernel_dtype,))
    print(f"machine: {info.get('gpu') or info['cpu']}; roofline {roof}", flush=True)
    points: list = []
    partial = os.path.join(out_dir, "partial-results.json")
    os.makedirs(out_dir, exist_ok=True)

    def progress(line: str) -> None:  # a crash or kill mid-run keeps what was measured so far
        print(line, flush=True)
        with open(partial, "w") as f:
            json.dump(harness.as_records(points), f)

    probes: list = []
    rounds_settings = rounds.RoundSettings(min_rounds=settings["repeats"],
                                           budget_s=settings.get("round_budget_s", settings["budget_s"]))
    harness.run_kernels(settings["shapes"], settings["sizes"], dev, settings["repeats"], settings["budget_s"],
                        providers=settings["providers"], progress=progress, points=points, probes=probes,
                        round_settings=rounds_settings, dtype=kernel_dtype)
    if settings["s1_tokens"]:
        harness.run_s1(settings["s1_tokens"], dev, progress=progress, points=points,
                       dtype=getattr(torch, settings.get("s1_dtype", "float32")))
        if settings.get("c1_families"):
            harness.run_c1_hf(settings["s1_tokens"], dev, settings["c1_families"], progress=progress, points=points,
                              dtype=getattr(torch, settings.get("s1_dtype", "float32")))
    roof["copy_gbps"] = max(roof["copy_gbps"], machine.copy_bandwidth(dev, 1024 if dev.type == "cuda" else 256))
    best = harness.finish(points, roof, probes)
    after = machine.conditions(settings.get("origin_cwd"))
    meta = dict(machine=info, label=machine.machine_label(info), date=datetime.date.today().isoformat(), roofline=roof,
                matmul_best_gflops=best, probes=probes, conditions=dict(before=before, after=after),
                disturbed=disturbance(probes, before, after),
                package=os.path.dirname(os.path.dirname(os.path.abspath(harness.__file__))),  # the erasure_fast measured
                repeats=settings["repeats"], sizes=settings["sizes"], shapes=settings["shapes"],
                check_tokens=harness.CHECK_TOKENS,
                check_tolerance={str(k).replace("torch.", ""): v for k, v in harness.TOLERANCE.items()},
                address_space_cap_bytes=address_space_cap,
                command=settings["command"])
    if settings.get("extra_shapes"):
        meta["extra_shapes"] = settings["extra_shapes"]
    records = harness.as_records(points)
    files = report.write(out_dir, meta, records)
    if os.path.exists(partial):
        os.remove(partial)
    return dict(meta=meta, results=records, files=files)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m erasure_fast.bench SETTINGS_JSON  (started by erasure_fast.bench.run)", file=sys.stderr)
        return 2
    settings = json.loads(argv[0])
    SHAPES.update(settings.get("extra_shapes") or {})  # this process only
    cap = cap_address_space() if torch.device(settings["device"]).type == "cpu" else None
    out = measure_and_report(settings, address_space_cap=cap)
    with open(settings["manifest"], "w") as f:
        json.dump({"files": out["files"]}, f)
    return 0
