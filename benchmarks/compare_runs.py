"""Do two benchmark runs agree? For every (workload, shape, size, provider) timed in both, the speedups
over TransformerLens (median of per-round ratios, with their inter-quartile ranges) must agree within
the reported spreads: each run's median lies inside the other run's [25 %, 75 %] interval, or the two
intervals overlap. Also lists any roofline flagged above 100 % and whether either run was disturbed.

Usage: python benchmarks/compare_runs.py RUN_A.json RUN_B.json [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json


def load(path: str):
    with open(path) as f:
        data = json.load(f)
    key = lambda r: (r["workload"], r["shape"], r["n_tokens"], r["provider"])  # noqa: E731
    return data["meta"], {key(r): r for r in data["results"]}


def agree(a: dict, b: dict) -> str:
    """"inside" (each median in the other's interval), "overlap" (intervals overlap), or "no"."""
    lo_a, hi_a, lo_b, hi_b = a["speedup_q25"], a["speedup_q75"], b["speedup_q25"], b["speedup_q75"]
    if lo_b <= a["speedup_vs_tl"] <= hi_b and lo_a <= b["speedup_vs_tl"] <= hi_a:
        return "inside"
    return "overlap" if max(lo_a, lo_b) <= min(hi_a, hi_b) else "no"


def compare(path_a: str, path_b: str) -> tuple:
    meta_a, a = load(path_a)
    meta_b, b = load(path_b)
    lines = [f"# Benchmark runs compared: `{path_a}` vs `{path_b}`", "",
             f"- disturbed: A {meta_a.get('disturbed', {}).get('disturbed')}, B {meta_b.get('disturbed', {}).get('disturbed')}",
             "", "| workload | shape | tokens | provider | speedup A [25 %, 75 %] | speedup B [25 %, 75 %] | agree |",
             "|---|---|---:|---|---|---|---|"]
    disagreements, flags = 0, []
    for k in sorted(set(a) & set(b)):
        ra, rb = a[k], b[k]
        for r, name in ((ra, "A"), (rb, "B")):
            if r.get("roofline_flag"):
                flags.append(f"{name} {k}: {r['roofline_flag']}")
        if ra.get("speedup_q25") is None or rb.get("speedup_q25") is None or k[3].startswith("transformer_lens"):
            continue
        verdict = agree(ra, rb)
        disagreements += verdict == "no"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]:,} | {k[3]} | {ra['speedup_vs_tl']:.1f}x [{ra['speedup_q25']:.1f}, "
                     f"{ra['speedup_q75']:.1f}] | {rb['speedup_vs_tl']:.1f}x [{rb['speedup_q25']:.1f}, "
                     f"{rb['speedup_q75']:.1f}] | {verdict} |")
    lines += ["", f"Speedups that disagree beyond both spreads: {disagreements}.",
              "Rooflines above 100 %: " + ("; ".join(flags) if flags else "none") + ".", ""]
    return "\n".join(lines), disagreements, flags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    text, disagreements, flags = compare(args.run_a, args.run_b)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if disagreements or flags else 0


if __name__ == "__main__":
    raise SystemExit(main())
