"""Which statistic ranks real erasure first: the planted models of `erasure_fast.demo.PLANTED_VARIANTS`
scanned at GELU-4L shape (and a small shape), the rank of every planted pair under each statistic
(`erasure_fast.scanning.ranking.RANK_STATISTICS`), and how many pairs pass the null threshold.

Usage: python benchmarks/ranking_ground_truth.py [--seeds 0,1,2] [--rows 16] [--out benchmarks/results]
(run as a script, so that the installed package -- with its compiled backend -- is imported, not the
source tree)
Writes ranking-ground-truth.{json,md}; every number comes from `erasure_fast.scan` on the default backend.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time

SHAPES = {
    "gelu-4l": None,  # erasure_fast.demo.GELU_4L_SHAPE
    "small": dict(n_layers=4, n_heads=8, d_head=32, d_model=256, d_mlp=256, d_vocab=300, n_ctx=128),
}


def measure(shape: str, variant: str, seed: int, rows: int) -> dict:
    from erasure_fast.demo import GELU_4L_SHAPE, PLANTED_VARIANTS, demo_corpus, planted_model, random_model
    from erasure_fast.scanning import scan
    from erasure_fast.scanning.ranking import RANK_STATISTICS, rank_pairs

    dims = SHAPES[shape] or GELU_4L_SHAPE
    planted = PLANTED_VARIANTS[variant]
    model = random_model(seed, dims) if planted is None else planted_model(seed=seed, dims=dims, planted=planted)[0]
    corpus = demo_corpus(rows, dims["n_ctx"], dims["d_vocab"], seed=seed + 3)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = scan(model, corpus, batch_size=8, out_dir=tmp, prepend_bos=0, progress=False, report=False)
    out = dict(shape=shape, variant=variant, seed=seed, tokens=res.meta["tokens"], scan_s=time.perf_counter() - t0, by={})
    truth = [] if planted is None else [(e, planted["writer"]) for e in planted["erasers"]]
    for by in RANK_STATISTICS:
        ranked = rank_pairs(res.summary, by)
        keys = list(zip(ranked.node, ranked.writer))
        out["by"][by] = dict(ranks=[keys.index(p) + 1 for p in truth], above_null=int(ranked.above_null.sum()),
                             pairs=len(ranked), threshold=float(ranked.null_threshold.iloc[0]),
                             top=[f"{n} onto {w}" for n, w in keys[:3]])
    return out


def markdown(records, meta) -> str:
    from erasure_fast.scanning.ranking import RANK_STATISTICS

    stats = list(RANK_STATISTICS)
    lines = ["# Ranking ground truth: rank of each planted pair (and pairs above the null) per statistic", "",
             f"{meta['date']}, {meta['machine']} ({meta.get('cpu', 'CPU not recorded')}); command `{meta['command']}`. Each cell: the ranks of the planted "
             "pairs (strongest target first; the ideal is 1, 2, ...) / pairs above the null of all downstream pairs. "
             "Variants: `erasure_fast.demo.PLANTED_VARIANTS`.", "",
             "| shape | variant | seed | " + " | ".join(stats) + " |", "|---|---|---|" + "---|" * len(stats)]
    for r in records:
        cells = [f"{','.join(map(str, r['by'][s]['ranks'])) or '-'} / {r['by'][s]['above_null']} of {r['by'][s]['pairs']}"
                 for s in stats]
        lines.append(f"| {r['shape']} | {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    ideal = {s: sum(all(rk == i + 1 for i, rk in enumerate(r["by"][s]["ranks"])) for r in records if r["variant"] != "null")
             for s in stats}
    planted_runs = sum(r["variant"] != "null" for r in records)
    lines += ["", "Planted runs with every planted pair at its ideal rank: "
              + ", ".join(f"{s} {ideal[s]}/{planted_runs}" for s in stats) + ".",
              "Null-model runs: pairs above the null per statistic: "
              + ", ".join(f"{s} {sum(r['by'][s]['above_null'] for r in records if r['variant'] == 'null')}" for s in stats)
              + f" (over {sum(r['variant'] == 'null' for r in records)} runs).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="model seeds")
    ap.add_argument("--rows", type=int, default=16, help="corpus rows (of n_ctx tokens) per scan")
    ap.add_argument("--shapes", default="small,gelu-4l")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    from erasure_fast.bench.machine import cpu_line, describe, machine_label
    from erasure_fast.demo import PLANTED_VARIANTS

    records = []
    for shape in args.shapes.split(","):
        for variant in PLANTED_VARIANTS:
            for seed in (int(s) for s in args.seeds.split(",")):
                r = measure(shape, variant, seed, args.rows)
                print(f"{shape:8s} {variant:7s} seed {seed}: " + "; ".join(
                    f"{s} {v['ranks']} ({v['above_null']} above null)" for s, v in r["by"].items()), flush=True)
                records.append(r)
    info = describe()
    meta = dict(date=datetime.date.today().isoformat(), machine=machine_label(info), cpu=cpu_line(info),
                command="python benchmarks/ranking_ground_truth.py " + " ".join(argv or []))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ranking-ground-truth.json"), "w") as f:
        json.dump(dict(meta=meta, records=records), f, indent=1)
    with open(os.path.join(args.out, "ranking-ground-truth.md"), "w") as f:
        f.write(markdown(records, meta))
    print(markdown(records, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
