"""Where a scan's time goes beyond the model's forward: S1 (GELU-4L shape, synthetic corpus, capture
engine, default backend) timed against the engine's bare forward in interleaved rounds, then one
scan under cProfile, whose per-function times give the parts (forward, fused attribution kernel,
residual points' dots, ranking statistics and their null dots, PR histograms, checkpoint, summary).
The profiled scan is slower than an unprofiled one by cProfile's own overhead (a few %); the ratio
line comes from the unprofiled rounds.

Usage (as a script, so that the installed package with its compiled kernels is imported, not the
source tree): python benchmarks/scan_breakdown.py [--tokens 65536] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import statistics
import tempfile
import time

import torch

# (label, file name, function name) of the parts, as cProfile names them; cumulative times
PARTS = (
    ("forward (capture engine)", "weights.py", "engine_capture"),
    ("fused attribution kernel", "~", "fused_attribution_f32"),
    ("residual points' dots", "attribution.py", "_resid_dots"),
    ("ranking statistics: null dots", "pair_stats.py", "null_dots"),
    ("ranking statistics: compiled pass", "pair_stats.py", "fold_pair_values"),
    ("PR histograms", "aggregate.py", "update_ratios"),
    ("all aggregation of a batch", "state.py", "update"),
    ("checkpoints", "job.py", "save_checkpoint"),
    ("summary (finish)", "job.py", "finish"),
)


def _cumulative(stats: pstats.Stats, file_name: str, function: str) -> float:
    """Cumulative seconds of ``function`` (in ``file_name``; "~" for a builtin) over the profile.
    RuntimeError when the profile has no such function: a renamed part must not read as 0 s."""
    found, total = False, 0.0
    for (path, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        builtin = file_name == "~" and function in name  # cProfile names builtins "<built-in method ...>"
        if builtin or (name == function and os.path.basename(path) == file_name):
            found, total = True, total + ct
    if not found:
        raise RuntimeError(f"{function} ({file_name}) is not in the scan's profile; update PARTS")
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="folder for scan_breakdown.{md,json} (default: print only)")
    args = ap.parse_args(argv)
    if args.tokens < 1024 or args.rounds < 1 or args.batch_size < 1:
        ap.error("--tokens must be >= 1024, --rounds and --batch-size >= 1")

    from erasure_fast.bench.workloads import SHAPES
    from erasure_fast.capture import validate_tokens
    from erasure_fast.demo import demo_corpus, gelu4l_shaped_bridge
    from erasure_fast.engine import EngineWeights, engine_capture
    from erasure_fast.models import model_spec
    from erasure_fast.scanning import scan

    model = gelu4l_shaped_bridge(seed=0, **SHAPES["gelu-4l"])
    corpus = demo_corpus(args.tokens // 1024, 1024)
    spec = model_spec(model)
    weights = EngineWeights.from_model(model, spec)
    n_batches = -(-len(corpus) // args.batch_size)

    def forward(rows=None):
        for lo in range(0, len(corpus) if rows is None else rows, args.batch_size):
            engine_capture(spec, weights, validate_tokens(torch.from_numpy(corpus[lo:lo + args.batch_size]).long(), spec))

    def run_scan(rows=None):
        with tempfile.TemporaryDirectory() as tmp:
            return scan(model, corpus if rows is None else corpus[:rows], batch_size=args.batch_size, out_dir=tmp,
                        resume=False, progress=False, report=False)

    forward(args.batch_size)  # warm-up: first-call costs land in no timed row
    backend = run_scan(args.batch_size).meta["backend"]
    pairs = []
    for r in range(args.rounds):
        times = []
        for fn in (forward, run_scan):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        pairs.append(times)
        print(f"round {r + 1}: forward {times[0]:.2f} s, scan {times[1]:.2f} s, ratio {times[1] / times[0]:.3f}", flush=True)
    ratios = [s / f for f, s in pairs]
    forward_s = statistics.median(f for f, _ in pairs)

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run_scan()
    prof.disable()
    profiled_s = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    rows = [(label, _cumulative(stats, f, name)) for label, f, name in PARTS]
    part = dict(rows)
    accounted = sum(part[k] for k in ("forward (capture engine)", "fused attribution kernel", "residual points' dots",
                                      "all aggregation of a batch", "checkpoints", "summary (finish)"))
    rows.append(("everything else (set-up, checks, frees, bookkeeping)", profiled_s - accounted))

    from erasure_fast.bench.machine import cpu_line, describe, machine_label

    info = describe()
    lines = [f"# Scan breakdown ({machine_label(info)}, {datetime.date.today()})", "",
             f"- command: `python benchmarks/scan_breakdown.py --tokens {args.tokens} --rounds {args.rounds}`; "
             f"scan backend {backend}, capture engine",
             f"- {len(corpus) * 1024:,} tokens of the GELU-4L shape in {n_batches} batches of {args.batch_size} x 1024; "
             f"{cpu_line(info)}",
             f"- scan / engine forward, {args.rounds} interleaved rounds: {', '.join('%.3f' % r for r in ratios)}; "
             f"median {statistics.median(ratios):.3f} ({100 * (statistics.median(ratios) - 1):+.1f} %)",
             f"- profiled scan (cProfile adds its own overhead): {profiled_s:.2f} s", "",
             "| part of the profiled scan | s | ms per batch | % of the bare forward |", "|---|---:|---:|---:|"]
    for label, sec in rows:
        lines.append(f"| {label} | {sec:.3f} | {1000 * sec / n_batches:.1f} | {100 * sec / forward_s:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "scan_breakdown.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "scan_breakdown.json"), "w") as f:
            json.dump(dict(machine=info, tokens=len(corpus) * 1024, batches=n_batches, backend=backend, rounds=pairs, ratios=ratios,
                           forward_median_s=forward_s, profiled_scan_s=profiled_s,
                           parts={label: sec for label, sec in rows}), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
