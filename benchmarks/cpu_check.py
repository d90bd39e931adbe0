"""The prepared check of the CPU kernels on the machine at hand, against the CPU targets (K1 at the
matmul rate, K1 / K2n / K2f against TransformerLens), in one command, for a CPU with no committed
results yet or after a kernel change:

1. the machine and the kernel paths it runs (`erasure-fast backends`, `cpp.cpu_paths()`);
2. K1 on every path this CPU runs and through torch's BLAS, one thread (`kernel_paths.py`);
3. `erasure-fast bench` of K1 / K2n / K2f at 8,192 tokens (GELU-4L shape), erasure_fast cpp against
   TransformerLens, fp32 and bf16, on the path the module selects;
4. on a CPU with AVX-512, the same fp32 bench on the avx2 path with torch's MKL held to AVX2: what an
   AVX2-only CPU would run, against the matmul such a CPU has;
5. ``summary.md``: every run's numbers and each target met or missed.

About 8 minutes on 2 cores. Results go to ``benchmarks/results/cpu-check-<cpu>-<date>-<commit>/``
unless ``--out`` names a folder (it must not exist yet: nothing is overwritten).

    python benchmarks/cpu_check.py [--out DIR] [--tokens 8192] [--dry-run]

``summarize(folder)`` rebuilds the summary of a folder of runs.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROVIDERS = "erasure_fast cpp,transformer_lens"
CPP, TL = "erasure_fast cpp", "transformer_lens"

# The targets (fractions of the in-run matmul rate of the inputs' dtype; speedups over TransformerLens).
K1_OF_MATMUL = {"avx2": 0.90, "avx512": 0.80, "avx512_bf16": 0.80, "amx": 0.80}
K1_BF16_AMX_OF_MATMUL = 0.50
K1_SPEEDUP, K2_SPEEDUP = 15.0, 100.0
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def runs_to_make(tokens: int, paths: dict) -> list:
    """[(folder name, extra environment, bench arguments)] of the benches for a CPU whose kernel paths
    (`cpp.cpu_paths()`) are ``paths``."""
    base = ["bench", "--shapes", "gelu-4l", "--sizes", str(tokens), "--providers", PROVIDERS]
    runs = [("fp32-auto", {}, base), ("bf16-auto", {}, base + ["--dtype", "bfloat16"])]
    if paths.get("avx512", {}).get("runs_here") and paths.get("avx2", {}).get("runs_here"):
        runs.append(("fp32-avx2-mkl-avx2", {"ERASURE_FAST_CPU_PATH": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
                     base))
    return runs


def _row(results: list, workload: str, provider: str):
    return next((r for r in results if r["workload"] == workload and r["provider"] == provider
                 and r["status"] == "ok"), None)


def _path_of(meta: dict) -> str:
    m = re.search(r"kernel path (\w+)", meta["machine"].get("cpp_backend", ""))
    return m.group(1) if m else "?"


def summarize_run(path: str) -> dict:
    """One bench run's JSON reduced to the numbers the targets are about."""
    with open(path) as f:
        data = json.load(f)
    meta, res = data["meta"], data["results"]
    k1 = _row(res, "K1", CPP)
    out = dict(run=os.path.basename(os.path.dirname(path)), path=_path_of(meta), cpu=meta["machine"]["cpu"],
               isa=meta["machine"].get("cpu_isa", ""), dtype=SHORT.get((k1 or {}).get("dtype"), "?"),
               disturbed=bool(meta["disturbed"]["disturbed"]), matmul=meta["matmul_best_gflops"])
    if k1:
        out["K1"] = dict(s=k1["median_s"], x=k1["speedup_vs_tl"], pct=k1["roofline_pct"])
    for workload, provider, key in (("K2n", CPP, "K2n"), ("K2n", CPP + " + lazy W_U table", "K2n table"),
                                    ("K2f", CPP, "K2f")):
        r = _row(res, workload, provider)
        if r:
            out[key] = dict(s=r["median_s"], x=r["speedup_vs_tl"])
    return out


def targets(run: dict) -> list:
    """[(target, value, met)] for one summarized run."""
    rows = []
    k1 = run.get("K1")
    if k1 and k1["pct"] is not None:
        if run["dtype"] == "bf16" and run["path"] == "amx":
            rows.append((f"bf16 K1 >= {K1_BF16_AMX_OF_MATMUL:.0%} of the bf16 matmul (amx)", f"{k1['pct']:.1f} %",
                         k1["pct"] >= 100 * K1_BF16_AMX_OF_MATMUL))
        elif run["dtype"] == "fp32" and run["path"] in K1_OF_MATMUL:
            bar = K1_OF_MATMUL[run["path"]]
            rows.append((f"fp32 K1 >= {bar:.0%} of the fp32 matmul ({run['path']})", f"{k1['pct']:.1f} %",
                         k1["pct"] >= 100 * bar))
    if k1 and run["dtype"] == "fp32":
        rows.append((f"fp32 K1 >= {K1_SPEEDUP:.0f}x TransformerLens", f"{k1['x']:.1f}x", k1["x"] >= K1_SPEEDUP))
    for key in ("K2n", "K2f"):
        if key in run:
            rows.append((f"{run['dtype']} {key} >= {K2_SPEEDUP:.0f}x TransformerLens", f"{run[key]['x']:.1f}x",
                         run[key]["x"] >= K2_SPEEDUP))
    return rows


def _cell(d: dict, key: str, pct: bool = False) -> str:
    v = d.get(key)
    if not v:
        return "-"
    t = f"{v['s'] * 1e3:.1f} ms" if v["s"] < 1 else f"{v['s']:.3f} s"
    extra = f", {v['pct']:.1f} %" if pct and v.get("pct") is not None else ""
    return f"{t}{extra}, {v['x']:.1f}x"


def summarize(folder: str) -> str:
    """summary.md of a folder of bench runs (one sub-folder per run): each run's numbers, then each
    target met or missed."""
    runs = [summarize_run(p) for p in sorted(glob.glob(os.path.join(folder, "*", "*.json")))]
    if not runs:
        raise FileNotFoundError(f"{folder}: no bench runs (*/*.json)")
    lines = [f"# CPU check: {runs[0]['cpu']} ({runs[0]['isa']})", "",
             "GELU-4L shape; erasure_fast cpp against TransformerLens's method; time = median over interleaved "
             "rounds, x = median of the per-round ratios, % = of the run's best matmul rate in the inputs' dtype.",
             "", "| run | kernel path | dtype | K1 | K2n, no table | K2n, lazy W_U table | K2f | disturbed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| `{r['run']}` | {r['path']} | {r['dtype']} | {_cell(r, 'K1', pct=True)} | {_cell(r, 'K2n')} "
                     f"| {_cell(r, 'K2n table')} | {_cell(r, 'K2f')} | {'yes' if r['disturbed'] else 'no'} |")
    lines += ["", "| run | target | value | met |", "|---|---|---:|---|"]
    for r in runs:
        for name, value, met in targets(r):
            lines.append(f"| `{r['run']}` | {name} | {value} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def _default_out() -> str:
    from erasure_fast.bench import machine

    cpu = re.sub(r"[^A-Za-z0-9]+", "", machine.describe()["cpu"])[:24] or "cpu"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return os.path.join(HERE, "results", f"cpu-check-{cpu}-{datetime.date.today()}-{rev or 'nogit'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="new folder for the results (default: benchmarks/results/cpu-check-...)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the bench runs (default: 8192)")
    p.add_argument("--repeats", type=int, default=5, help="kernel_paths.py's repeats (default: 5)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    if a.tokens < 2:
        p.error(f"--tokens must be at least 2, got {a.tokens}")
    from erasure_fast.backends import cpp

    ok, why = cpp.available()
    if not ok:
        p.error(f"the C++ backend is unavailable: {why}")
    out = os.path.abspath(a.out or _default_out())
    if os.path.exists(out) and not a.dry_run:
        p.error(f"--out {out} exists; name a new folder")
    cli = [sys.executable, "-m", "erasure_fast.cli"]
    steps = [(f"{out}/backends.txt", {}, cli + ["backends"]),
             (f"{out}/kernel_paths.log", {}, [sys.executable, os.path.join(HERE, "kernel_paths.py"), "--tokens",
                                              str(a.tokens), "--repeats", str(a.repeats), "--out",
                                              f"{out}/kernel_paths.md"])]
    for name, env, args in runs_to_make(a.tokens, cpp.cpu_paths()):
        steps.append((f"{out}/{name}.log", env, cli + args + ["--out", f"{out}/{name}"]))
    for log, env, cmd in steps:
        print(" ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(cmd), ">", shlex.quote(log)]), flush=True)
    if a.dry_run:
        return 0
    os.makedirs(out)
    with open(f"{out}/cpu_paths.json", "w") as f:
        json.dump(dict(cpu_paths=cpp.cpu_paths(), build_info=cpp.build_info()), f, indent=1)
    # the CLI from a folder outside the checkout: from its root, -m would import the source tree
    cwd = tempfile.mkdtemp()
    for log, env, cmd in steps:
        with open(log, "w") as f:
            done = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            print(f"failed (exit {done.returncode}): {shlex.join(cmd)}; see {log}", file=sys.stderr)
            return 1
    text = summarize(out)
    with open(f"{out}/summary.md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
