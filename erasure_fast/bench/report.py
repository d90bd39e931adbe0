"""Benchmark outputs: <machine>-<date>.json + .csv, a markdown report with tables, PNG plots."""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, List

from . import machine

WORKLOAD_TITLES = {
    "K1": "K1: next-token DLA + dots / norms of every head and MLP with every head as writer",
    "K2n": "K2n: next-token DLA only (warm)",
    "K2n_cold": "K2n cold: next-token DLA only, first call",
    "K2f": "K2f: logit-difference DLA, one fixed (correct, incorrect) pair",
    "S1": "S1: erasure scan of a synthetic corpus (forward + attribution + aggregation)",
    "C1": "C1: capture -- the forward pass without unembedding (z, MLP outputs, embedding, final scale), S1's corpus",
}


def _fmt(x, spec="{:.3g}") -> str:
    return "" if x is None else spec.format(x)


def _cap(meta: dict) -> str:
    if "address_space_cap_bytes" not in meta:  # results written before the cap was recorded
        return " of 85 % of RAM"
    cap = meta["address_space_cap_bytes"]
    return f" of {cap / 2**30:.1f} GiB" if cap else " (none in this run: GPU, or no limit known)"


def _tolerances(meta: dict) -> str:
    return ", ".join(f"{dtype} {tol:.0e}" for dtype, tol in meta.get("check_tolerance", {}).items())


def _conditions(meta: dict) -> List[str]:
    if "conditions" not in meta:  # results written before conditions were recorded
        return []
    c, d = meta["conditions"], meta.get("disturbed", {})
    before, after = c["before"], c["after"]

    def load(x):
        return "n/a" if not x.get("loadavg") else "/".join(f"{v:.2f}" for v in x["loadavg"])

    def busy(x):
        return "n/a" if x.get("busy_fraction") is None else f"{100 * x['busy_fraction']:.0f} %"

    lines = [
        f"- conditions: CPUs busy with other work {busy(before)} before, {busy(after)} after; load average "
        f"(1/5/15 min) {load(before)} before, {load(after)} after; CPU governor "
        f"{before['governor']}; threads {before['threads']}; git {before.get('git_commit') or 'n/a'}; "
        + ", ".join(f"{k} {v}" for k, v in before["versions"].items()),
        "- disturbed: " + ("**yes** -- " + "; ".join(d["reasons"]) if d.get("disturbed") else
                           f"no (matmul probes within each point within {100 * d.get('worst_probe_spread', 0):.0f} % of their best)"),
    ]
    return lines


def _speedup(r: dict) -> str:
    if r.get("speedup_vs_tl") is None:
        return ""
    if r.get("speedup_q25") is None:
        return f"{r['speedup_vs_tl']:.1f}x"
    return f"{r['speedup_vs_tl']:.1f}x [{r['speedup_q25']:.1f}, {r['speedup_q75']:.1f}]"


def _roofline(r: dict) -> str:
    if r.get("roofline_flag"):
        return "**>100 %: measurement problem**"
    return _fmt(r.get("roofline_pct"), "{:.1f}")


def _times(r: dict) -> str:
    if r.get("q25_s") is None:  # older results: min-max of the repeats
        return f"{min(r['times_s']):.4g}-{max(r['times_s']):.4g}" if r["times_s"] else ""
    return f"{r['min_s']:.4g} / [{r['q25_s']:.4g}, {r['q75_s']:.4g}]"


def markdown(meta: dict, records: List[dict]) -> str:
    m = meta["machine"]
    roof = meta["roofline"]
    best = meta.get("matmul_best_gflops", roof["matmul_gflops"])
    interleaved = "probes" in meta
    lines = [
        f"# Benchmark {meta['label']} ({meta['date']})", "",
        (f"- machine: {m['gpu']}; " if "gpu" in m else "- machine: ") + f"{machine.cpu_line(m)}; "
        f"transformer_lens {m.get('transformer_lens', '-')}, triton {m.get('triton', '-')}",
        "- roofline reference: matmul " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in best.items())
        + (" (the best of the start-of-run measurement and every round's probe)" if interleaved else "")
        + f"; copy {roof['copy_gbps']:.1f} GB/s" + (" (best of the start and the end of the run)" if interleaved else ""),
        (f"- timing: providers of a point run in interleaved rounds (order rotated each round, a matmul probe before "
         f"each), at least {meta['repeats']} rounds, until every provider's per-round ratio to TransformerLens has a "
         "relative inter-quartile range within 10 % or the point's budget ends (the stop reason is given per row); "
         "time = median over rounds, with min / [25 %, 75 %]; speedup = median of the per-round ratios t_TL / t_provider "
         "[25 %, 75 %]" if interleaved else
         f"- timing: median of {meta['repeats']} repeats after a warm-up call (S1: one run); speedup = TransformerLens "
         "time / provider time")
        + "; memory = peak above the pre-call baseline during the first call (RSS on CPU, allocated on GPU); roofline % = "
        "nominal FLOPs / time / the reference matmul rate (K1: projections + each distinct dot once, see workloads.flops; K2f: "
        "the head-space count; none for K2n, whose head-space cost depends on the number of distinct targets, or S1); a value "
        "above 100 % means the reference is too low and is shown as a measurement problem, not a number; oom = allocation "
        f"failed under the benchmark process's address-space cap{_cap(meta)}",
    ] + ([
        f"- correctness: before timing, every provider's output on each point is compared with the float64 reference "
        f"(torch backend) on the first {meta['check_tokens']:,} tokens; wrong = max |error| / max |reference| above "
        f"the tolerance ({_tolerances(meta)}): not timed; S1 (aggregates) is not checked this way"
    ] if "check_tokens" in meta else []) + _conditions(meta) + [  # results written before the check existed have none
        f"- command: `{meta['command']}`",
    ] + ([f"- note: {meta['note']}"] if meta.get("note") else []) + [""]
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["shape"]), []).append(r)
    for (workload, shape), rows in groups.items():
        lines += [f"## {WORKLOAD_TITLES.get(workload, workload)} - {shape}", "",
                  "| tokens | provider | status | median s | min / [25 %, 75 %] s | rounds | tokens/s | speedup vs TL [25 %, 75 %] "
                  "| roofline % | peak extra MiB |",
                  "|---:|---|---|---:|---|---|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["n_tokens"], r["provider"])):
            rounds = f"{r.get('rounds', '')} ({r['stop']})" if r.get("stop") else str(len(r["times_s"]))
            lines.append(f"| {r['n_tokens']:,} | {r['provider']} | {r['status']}{(' (' + r['note'] + ')') if r['status'] != 'ok' and r['note'] else ''} | "
                         f"{_fmt(r['median_s'], '{:.4g}')} | {_times(r)} | {rounds} | {_fmt(r['tokens_per_s'], '{:,.0f}')} | "
                         f"{_speedup(r)} | {_roofline(r)} | {_fmt(r['peak_extra_mib'], '{:,.0f}')} |")
        lines.append("")
    return "\n".join(lines)


def plots(records: List[dict], out_prefix: str) -> Dict[str, str]:
    from ..plotting import colormap, new_figure

    files = {}
    kernel = [r for r in records if r["workload"] not in ("S1", "C1") and r["status"] == "ok"]
    shapes = sorted({r["shape"] for r in kernel})
    workloads = [w for w in ("K1", "K2n", "K2f") if any(r["workload"] == w for r in kernel)]
    names = sorted({r["provider"] for r in kernel})
    colors = {n: colormap("tab10")(i % 10) for i, n in enumerate(names)}  # one colour per provider everywhere
    for key, ylabel, log in (("tokens_per_s", "tokens / s", True), ("speedup_vs_tl", "speedup over TransformerLens", True),
                             ("peak_extra_mib", "peak extra memory (MiB)", True)):
        if not workloads or not shapes:
            break
        fig, axes = new_figure((4.2 * len(workloads), 3.4 * len(shapes)), len(shapes), len(workloads), squeeze=False)
        for i, shape in enumerate(shapes):
            for j, w in enumerate(workloads):
                ax = axes[i][j]
                rows = [r for r in kernel if r["shape"] == shape and r["workload"] == w and r[key]]
                for provider in sorted({r["provider"] for r in rows}):
                    pts = sorted((r["n_tokens"], r[key]) for r in rows if r["provider"] == provider)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=provider, color=colors[provider])
                ax.set_xscale("log")
                if log:
                    ax.set_yscale("log")
                ax.set_title(f"{w} - {shape}", fontsize=9)
                ax.set_xlabel("tokens")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[n], marker="o") for n in names]
        fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = f"{out_prefix}-{key}.png"
        fig.savefig(path, dpi=110)
        files[os.path.basename(path)] = path
    return files


def rewrite(json_path: str, note: str = "") -> Dict[str, str]:
    """Re-derive speedups / roofline and rewrite every output of a run from its JSON (same measurements)."""
    from .harness import Point, as_records, finish

    data = json.load(open(json_path))
    points = [Point(**r) for r in data["results"]]
    for p in points:  # recompute the derived columns from the raw timings
        p.tokens_per_s = p.roofline_pct = None
        if p.rounds == 0:  # one-at-a-time results: speedup = ratio of medians, recomputed
            p.speedup_vs_tl = None
        if p.times_s and p.status == "ok" and p.rounds == 0:
            import statistics

            p.median_s = statistics.median(p.times_s)
    finish(points, data["meta"]["roofline"], data["meta"].get("probes"))
    meta = dict(data["meta"])
    if note:
        meta["note"] = note
    return write(os.path.dirname(json_path), meta, as_records(points))


def write(out_dir: str, meta: dict, records: List[dict]) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, f"{meta['label']}-{meta['date']}")
    files = {}
    with open(prefix + ".json", "w") as f:
        json.dump({"meta": meta, "results": records}, f, indent=1)
    files["json"] = prefix + ".json"
    with open(prefix + ".csv", "w", newline="") as f:
        cols = [k for k in records[0] if k != "times_s"] + ["times_s"] if records else []
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in records:
            w.writerow({**r, "times_s": " ".join(f"{t:.6g}" for t in r["times_s"])})
    files["csv"] = prefix + ".csv"
    files.update(plots(records, prefix))
    md = markdown(meta, records)
    md += "\n" + "\n".join(f"![{k}]({os.path.basename(v)})" for k, v in files.items() if k.endswith(".png")) + "\n"
    with open(prefix + ".md", "w") as f:
        f.write(md)
    files["md"] = prefix + ".md"
    return files
