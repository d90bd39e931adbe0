"""The scan's compiled aggregation kernels on one real batch, per kernel path (and against another
build): the projection-ratio histograms (`ratio_stats_batch`), the DLA histograms
(`series_stats_batch`), the ranking statistics of the (node, writer) pairs (`pair_stats_batch`,
one call per position bucket) and their null dots (`null_dots`, also against the torch products a
scan runs where there is no kernel).

One scan batch of the GELU-4L-shaped demo model (8 x 1024 tokens of the demo corpus) runs with the
extension's entries wrapped, so each kernel's arguments are recorded exactly as the scan passed them
(dots read in place from the fused kernel's output, the real position buckets and bin ranges). Then
every variant (this build's kernel paths, and with --other the same paths of another build, loaded
as in benchmarks/ab_builds.py) reruns those calls, interleaved as `erasure_fast.bench.interleave`
does, under its three cache states. A call adds to the recorded histograms in place (as the scan
does); the counts grow, the work per call does not change.

Usage (as a script, so that the installed package with its compiled kernels is imported):
    python benchmarks/scan_aggregates.py [--paths auto,avx2] [--other DIR] [--rounds 7] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

#: the kernels timed, as the extension names their float32 entries
KERNELS = ("ratio_stats_batch_f32", "series_stats_batch_f32", "pair_stats_batch_f32", "null_dots_f32")
#: the torch products `null_dots` runs where there is no kernel, timed beside it
TORCH_NULL_DOTS = "null_dots (torch products)"


def record_batch(n_rows: int) -> Dict[str, List[Tuple[list, dict]]]:
    """{entry: [(args, kwargs) of each call]} of one scan batch of ``n_rows`` x 1024 tokens, and under
    TORCH_NULL_DOTS the arguments of the scan's `null_dots` calls."""
    import erasure_fast._C as C
    import erasure_fast.scanning.state as state
    from erasure_fast.bench.workloads import SHAPES
    from erasure_fast.demo import demo_corpus, gelu4l_shaped_bridge
    from erasure_fast.scanning import scan

    calls: Dict[str, List[Tuple[list, dict]]] = {name: [] for name in (*KERNELS, TORCH_NULL_DOTS)}
    originals = {name: getattr(C, name) for name in KERNELS}
    null_dots = state.null_dots

    def recorder(name):
        def call(*args, **kwargs):
            calls[name].append((copy.deepcopy(list(args)), dict(kwargs)))  # before the in-place adds
            return originals[name](*args, **kwargs)
        return call

    def null_recorder(*args):
        calls[TORCH_NULL_DOTS].append((list(args), {}))
        return null_dots(*args)

    model = gelu4l_shaped_bridge(seed=0, **SHAPES["gelu-4l"])
    try:
        for name in KERNELS:
            setattr(C, name, recorder(name))
        state.null_dots = null_recorder
        with tempfile.TemporaryDirectory() as tmp:
            scan(model, demo_corpus(n_rows, 1024), batch_size=n_rows, out_dir=tmp, resume=False, progress=False,
                 report=False)
    finally:
        for name, fn in originals.items():
            setattr(C, name, fn)
        state.null_dots = null_dots
    missing = [name for name, got in calls.items() if not got]
    if missing:
        raise SystemExit(f"the scan called no {missing}: update KERNELS")
    return calls


def values_per_batch(name: str, calls: List[Tuple[list, dict]]) -> int:
    """How many values the recorded calls of ``name`` bin (9 statistics per pair and token)."""
    if name == "pair_stats_batch_f32":
        return sum(args[0].shape[0] * args[5].shape[0] * 9 for args, _ in calls)
    if name == "ratio_stats_batch_f32":
        return sum(sum(b.shape[1] * b.shape[2] for b in args[0]) * args[0][0].shape[0] for args, _ in calls)
    if name == "null_dots_f32":  # one multiply-add per activation and column
        return sum(sum(x.size * d.shape[1] for x, d in zip(args[0], args[1])) for args, _ in calls)
    return sum(args[0].size for args, _ in calls)


def replay(module, name: str, calls: List[Tuple[list, dict]]) -> Callable[[], None]:
    """The recorded ``calls`` of entry ``name``, run by ``module``. Builds whose ranking statistics
    take no position buckets (before they did, said by the entry's docstring) get what their scan
    did: per bucket, the bucket's tokens gathered and one pass over them, with the null dots
    pair-major ([P, T]) where that entry says so; the gathers are timed with their passes."""
    entry = getattr(module, name)
    doc = entry.__doc__ or ""
    if name != "pair_stats_batch_f32" or "n_buckets" in doc:
        def as_recorded():
            for a, kw in calls:
                entry(*a, **kw)
        return as_recorded
    pair_major = "null_dots [P, T]" in doc

    def per_bucket():
        for (dots, norms, null, resid, writers, pairs, lo, inv, nb, hists, bucket, _n), kw in calls:
            for b in np.unique(bucket):
                sel = np.flatnonzero(bucket == b)
                nd = null[sel]
                entry(dots[sel], norms[sel], np.ascontiguousarray(nd.T) if pair_major else nd, resid[sel], writers,
                      pairs, lo, inv, nb, [h[b:b + 1] if h.shape[0] > 1 else h for h in hists], **kw)
    return per_bucket


def torch_null_dots(calls: List[Tuple[list, dict]]) -> Callable[[], object]:
    """The recorded `null_dots` calls as a scan without the kernel runs them (torch products)."""
    import erasure_fast.scanning.pair_stats as pair_stats

    def run():
        kernel = pair_stats.scan_kernel
        pair_stats.scan_kernel = lambda name, values: None
        try:
            for args, _ in calls:
                pair_stats.null_dots(*args)
        finally:
            pair_stats.scan_kernel = kernel
    return run


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8, help="rows of 1024 tokens in the batch")
    ap.add_argument("--paths", default="auto", help="kernel paths of each build, comma-separated ('auto': the dispatched one)")
    ap.add_argument("--other", default=None, help="an installed copy of another build (benchmarks/ab_builds.py)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--flush-mib", type=int, default=512, help="written before each cold call (more than the caches)")
    ap.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.rounds < 1:
        ap.error("--rows and --rounds must be >= 1")

    import erasure_fast._C as C
    from erasure_fast.bench import machine
    from erasure_fast.bench.interleave import CONDITIONS, interleaved, save_table

    runs_here = lambda module: [n for n, v in module.cpu_paths().items() if v["runs_here"]]  # noqa: E731
    paths = args.paths.split(",")
    unknown = [p for p in paths if p != "auto" and p not in runs_here(C)]
    if unknown:
        ap.error(f"--paths: {unknown} do not run here (these do: {runs_here(C)})")
    builds = {"this build": C}
    if args.other:
        sys.path.append(os.path.dirname(os.path.abspath(__file__)))
        from ab_builds import load_other

        builds = {"other build": load_other(args.other), **builds}
    auto = C.select_cpu_path("auto")

    calls = record_batch(args.rows)
    flush = torch.empty(args.flush_mib * 2**20 // 4)
    info = machine.describe()
    lines = [f"# Scan aggregation kernels ({info['cpu']})", "",
             f"{machine.cpu_line(info)}; one scan batch of {args.rows} x 1024 tokens (GELU-4L-shaped demo model),"
             f" {args.rounds} rounds, the variants' order alternating; time = median per batch;"
             f" ratio = median of the per-round ratios to the first variant.", "",
             f"Command: `python benchmarks/scan_aggregates.py --rows {args.rows} --paths {args.paths} --rounds {args.rounds}"
             f"{' --other DIR' if args.other else ''} --flush-mib {args.flush_mib}`", "",
             "M values/s: values binned per second (null dots: multiply-adds).", "",
             "| kernel | variant | caches | ms per batch | M values/s | time / the first variant's (< 1: faster) |",
             "|---|---|---|---:|---:|---:|"]
    for name in KERNELS:
        n_values = values_per_batch(name, calls[name])
        variants: Dict[str, Callable[[], object]] = {}
        if name == "null_dots_f32":
            variants[TORCH_NULL_DOTS] = torch_null_dots(calls[TORCH_NULL_DOTS])
        for label, module in builds.items():
            for path in paths:
                chosen = auto if path == "auto" else path
                if chosen not in runs_here(module) or not hasattr(module, name):
                    continue

                def run(module=module, chosen=chosen, work=replay(module, name, calls[name])):
                    module.select_cpu_path(chosen)
                    work()

                variants[f"{label}, {chosen}"] = run
        times = interleaved(variants, args.rounds, flush)
        first = next(iter(variants))
        for cond in CONDITIONS:
            for v in variants:
                t, t0 = np.array(times[(v, cond)]), np.array(times[(first, cond)])
                lines.append(f"| {name} | {v} | {cond} | {np.median(t) * 1e3:.2f} | {n_values / np.median(t) / 1e6:.0f} |"
                             f" {np.median(t / t0):.3f} |")
        print(*lines[-len(CONDITIONS) * len(variants):], sep="\n", flush=True)
    for module in builds.values():
        module.select_cpu_path("auto")
    return save_table(lines, args.out)


if __name__ == "__main__":
    main()
