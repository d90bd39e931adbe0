"""Offline compile report of the Triton kernels (no GPU needed): every specialisation the GELU-4L
paths launch, every autotune config, compiled for an NVIDIA target (default sm_90, H100/H200).

The launches are not hand-copied: the kernel objects of ``kernels.fused_attribution`` and
``kernels.dla_table`` are replaced by recorders, and the Triton backend's own dispatch
(``erasure_fast.backends.triton.run`` on ``contract.validate`` inputs) is run on CPU tensors of the
real shapes; each recorded launch (arguments, constexprs, launch options, and for the autotuned
kernel its config list) is then specialised the way ``JITFunction.run`` does it and compiled with
``triton.compile`` for the target. Per compile it reports wall seconds, registers per thread,
spill stores / loads and stack frame (ptxas -v, the ptxas run of the compile itself), shared memory
(Triton metadata), whether it fits the target's shared memory, and compiler / ptxas refusals.

Usage (the repo root is put on sys.path; put another triton first on PYTHONPATH to use it)::

    PYTHONPATH=/tmp/triton36 python benchmarks/triton_compile_report.py --label before
    python benchmarks/triton_compile_report.py --workloads K1-fp32 \\
        --fused-configs "16,32,16,4,2;16,32,16,8,2"          # try other autotune configs

Writes ``<out>/<label>.json`` and ``<out>/<label>.md``; ``--compare old.json`` adds a before / after
summary per kernel and workload (compiles, compile seconds, registers, spills, launch problems).
Compile seconds are this machine's CPU (compiles run one at a time, never from the Triton cache, after
one untimed warm-up compile); the GPU machine's first call adds autotune benchmarking on top.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Largest dynamic shared memory per block (opt-in) by compute capability, bytes.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

WORKLOADS = {
    # name: (dtype, kind) -- the GELU-4L requests of tests/test_gpu.py and the K1/K2 benchmark
    "K1-fp32": ("float32", "K1"),  # gathered next-token DLA (centred) + dots/norms, M = 4, all heads writers
    "K1-bf16": ("bfloat16", "K1"),
    "K2n-fp32": ("float32", "K2n"),  # DLA only, gathered next-token direction
    "K2f-fp32": ("float32", "K2f"),  # DLA only, one fixed direction (logit-difference pair)
}


class Recorder:
    """Stands in for a @jit kernel (or an Autotuner) and records each launch instead of running it."""

    def __init__(self, kernel, launches: list, name: str):
        self.kernel, self.launches, self.name = kernel, launches, name
        from triton.runtime.jit import JITFunction

        self.fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # the JITFunction under an Autotuner
        self.configs = [] if isinstance(kernel, JITFunction) else list(kernel.configs)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(kernel=self.name, fn=self.fn, args=args, kwargs=kwargs,
                                      configs=self.configs if self.configs else None))
        return launch


def record_launches(workload: str, T: int, fused_configs) -> list:
    """Run the backend dispatch for one workload with recording kernels; return the launches."""
    import torch

    import erasure_fast.kernels.dla_table as dt
    import erasure_fast.kernels.fused_attribution as fa
    from erasure_fast.backends import triton as bt
    from erasure_fast.contract import validate

    dtype_name, kind = WORKLOADS[workload]
    dtype = getattr(torch, dtype_name)
    N, H, D, M, V = 32, 64, 512, 4, 64  # GELU-4L; V (vocabulary rows) does not enter any signature
    launches: list = []
    saved = {}
    patch = [(fa, "_kernel"), (fa, "_fused_attribution_kernel"), (dt, "_dla_gathered_kernel"),
             (dt, "_dla_fixed_kernel")]
    for mod, attr in patch:
        saved[(mod, attr)] = getattr(mod, attr)
        rec = Recorder(getattr(mod, attr), launches, "")
        rec.name = rec.fn.fn.__name__.lstrip("_")  # the Python function under the JITFunction
        if attr == "_kernel" and fused_configs is not None:
            rec.configs = fused_configs
        setattr(mod, attr, rec)
    saved_bt = {k: getattr(bt, k) for k in ("_kernels", "_interpret", "available")}
    bt._kernels = lambda: (fa, dt)
    bt._interpret = lambda: True  # only to let CPU tensors through run(); the kernels were decorated for GPU
    bt.available = lambda: (True, "recording")
    try:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(T, N, H, generator=g).to(dtype)
        W_O = (torch.randn(N, H, D, generator=g) * 0.035).to(dtype)
        dirs = (torch.randn(V, D, generator=g) * 0.035).to(dtype)
        scale = torch.rand(T, generator=g) + 0.5
        ids = torch.randint(-1, V, (T,), generator=g)
        if kind == "K1":
            extra = torch.randn(T, M, D, generator=g).to(dtype)
            inp = validate(z, W_O, dirs, scale, list(range(N)), extra, direction_ids=ids, center=True)
        elif kind == "K2n":
            inp = validate(z, W_O, dirs, scale, [], direction_ids=ids, center=True, with_norms=False)
        else:
            inp = validate(z, W_O, (dirs[5] - dirs[7])[None], scale, [], center=True, with_norms=False)
        try:
            bt.run(inp)
        except Exception:  # outputs are never filled (nothing launched); only the recorded launches count
            if not launches:
                raise
    finally:
        for (mod, attr), v in saved.items():
            setattr(mod, attr, v)
        for k, v in saved_bt.items():
            setattr(bt, k, v)
    return launches


def parse_configs(text: str):
    import triton

    out = []
    for part in text.split(";"):
        bt_, bd, bh, nw, ns = (int(x) for x in part.split(","))
        out.append(triton.Config(dict(BLOCK_T=bt_, BLOCK_D=bd, BLOCK_H=bh), num_warps=nw, num_stages=ns))
    return out


_PTXAS_RE = {
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}


def compile_one(fn, args, kwargs, arch: int) -> dict:
    """Specialise like JITFunction.run, compile for cuda:<arch>, return the measurements."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    known = backend.parse_options({}).__dict__
    if "debug" in known:
        kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    if "instrumentation_mode" in known:
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    row = dict(signature={k: str(v) for k, v in signature.items() if v != "constexpr"},
               constexprs={fn.arg_names[k[0]]: (v.value if hasattr(v, "value") else v)
                           for k, v in constexprs.items() if len(k) == 1},
               num_warps=options.num_warps, num_stages=options.num_stages)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # never a cache hit (the warm-up compiles the first row once)
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # ptxas or compiler refusal
        row.update(compile_s=round(time.perf_counter() - t0, 2), status="refused",
                   error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300],
                   ptxas_log=buf.getvalue()[-2000:])
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    log = buf.getvalue()
    for key, rx in _PTXAS_RE.items():
        m = rx.findall(log)
        row[key] = int(m[-1]) if m else None
    row["shared_bytes"] = int(k.metadata.shared)
    limit = MAX_SHARED.get(arch)
    row["fits_shared"] = None if limit is None else row["shared_bytes"] <= limit
    row["status"] = "ok" if row["fits_shared"] is not False else "too much shared memory"
    # cross-check with the cubin itself
    row["cuobjdump"] = cuobjdump_usage(k.asm.get("cubin"))
    return row


def cuobjdump_usage(cubin) -> str | None:
    if not cubin:
        return None
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", r.stdout)
    return m.group(0) if m else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def launch_rows(workloads, T, arch, fused_configs, log=print) -> list:
    rows, seen = [], {}
    for wl in workloads:
        for ln in record_launches(wl, T, fused_configs):
            configs = ln["configs"] or [None]
            for ci, cfg in enumerate(configs):
                kw = dict(ln["kwargs"])
                if cfg is not None:
                    kw.update(cfg.all_kwargs())
                meta = {k: v for k, v in kw.items()}
                key = (ln["kernel"], repr([(type(a).__name__, getattr(a, "dtype", a)) for a in ln["args"]]),
                       repr(sorted(meta.items(), key=lambda x: x[0])))
                if key in seen:
                    seen[key]["workloads"].append(wl)
                    continue
                cfg_txt = None
                if cfg is not None:
                    c = cfg.kwargs
                    cfg_txt = f"T{c['BLOCK_T']} D{c['BLOCK_D']} H{c['BLOCK_H']} w{cfg.num_warps} s{cfg.num_stages}"
                if not rows:  # untimed warm-up: the first compile of a process also pays imports / MLIR setup
                    compile_one(ln["fn"], ln["args"], kw, arch)
                log(f"[{wl}] {ln['kernel']} {cfg_txt or ''} ...")
                row = dict(kernel=ln["kernel"], workloads=[wl], config=cfg_txt, autotuned=cfg is not None,
                           config_index=ci if cfg is not None else None)
                row.update(compile_one(ln["fn"], ln["args"], kw, arch))
                log(f"    {fmt_row_short(row)}")
                seen[key] = row
                rows.append(row)
    return rows


def fmt_row_short(r) -> str:
    if r["status"] == "refused":
        return f"REFUSED after {r['compile_s']} s: {r['error']}"
    return (f"{r['compile_s']} s, {r['registers']} regs, spill st/ld {r['spill_store_bytes']}/{r['spill_load_bytes']} B, "
            f"stack {r['stack_bytes']} B, smem {r['shared_bytes']} B ({r['status']})")


def spec_text(r) -> str:
    keep = ("GATHERED", "HAS_INCORRECT", "CENTER", "HAS_EXTRA", "GRAM", "WR_IDENTITY", "UPCAST", "DOT_PREC",
            "WITH_DLA", "NB_P", "WB_P", "M_P", "H_P", "BLOCK_N", "BLOCK_K")
    c = r["constexprs"]
    parts = [f"{k}={c[k]}" for k in keep if k in c]
    z = r["signature"].get("z_ptr")
    return (f"z {z}; " if z else "") + ", ".join(parts)


def spec_key(r) -> str:
    """A specialisation across reports: kernel and the workloads that launch it (launch constexprs may change)."""
    return f"{r['kernel']} ({', '.join(sorted(set(r['workloads'])))})"


def summary(rs) -> str:
    ok = [r for r in rs if r["status"] != "refused"]
    if not ok:
        return f"{len(rs)} | {sum(r['compile_s'] for r in rs):.1f} | | | all refused"
    st = [r["spill_store_bytes"] or 0 for r in ok]
    ld = [r["spill_load_bytes"] or 0 for r in ok]
    regs = [r["registers"] for r in ok]
    over = sum(1 for r in ok if r["fits_shared"] is False)
    refused = len(rs) - len(ok)
    return (f"{len(rs)} | {sum(r['compile_s'] for r in rs):.1f} | {min(regs)}-{max(regs)} | "
            f"{min(st)}-{max(st)} / {min(ld)}-{max(ld)} | {over} over smem, {refused} refused")


def write_report(rows, meta, out: Path, label: str, old=None) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{label}.json", out / f"{label}.md"
    jpath.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = [f"# Triton compile report: {label}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["- columns: compile s = wall seconds of `triton.compile` on this machine's CPU (never from the cache, one at a "
              "time, after an untimed warm-up compile); regs = registers per thread; spill st / ld and stack = bytes per thread from the compile's own "
              "`ptxas -v`; smem = Triton's dynamic shared memory per program; status: ok / too much shared memory "
              "(over the target's opt-in limit: fails at launch) / refused (compiler or ptxas error)", ""]
    by_spec: dict = {}
    for r in rows:
        by_spec.setdefault((r["kernel"], spec_text(r)), []).append(r)
    if old:
        olds: dict = {}
        for r in old["rows"]:
            olds.setdefault(spec_key(r), []).append(r)
        news: dict = {}
        for r in rows:
            news.setdefault(spec_key(r), []).append(r)
        ol = old["meta"].get("label")
        lines += [f"## Before ({ol}) / after ({label})", "",
                  "| kernel (workloads) | report | compiles | compile s | regs | spill st / ld B (min-max) | problems |",
                  "|---|---|---:|---:|---:|---|---|"]
        for k in list(dict.fromkeys(list(olds) + list(news))):
            for name, rs in ((ol, olds.get(k)), (label, news.get(k))):
                lines.append(f"| {k} | {name} | " + (summary(rs) if rs else "0 | | | | not launched") + " |")
        ot, nt = sum(r["compile_s"] for r in old["rows"]), sum(r["compile_s"] for r in rows)
        lines += ["", f"All rows: {len(old['rows'])} compiles, {ot:.1f} s ({ol}) -> {len(rows)} compiles, "
                      f"{nt:.1f} s ({label}).", ""]
    total = sum(r["compile_s"] for r in rows)
    for (kernel, spec), rs in by_spec.items():
        wls = sorted({w for r in rs for w in r["workloads"]})
        lines += [f"## {kernel} ({', '.join(wls)})", "", f"`{spec}`", ""]
        head = "| config | warps | stages | compile s | regs | spill st / ld B | stack B | smem B | status |"
        sep = "|---|---:|---:|---:|---:|---:|---:|---:|---|"
        lines += [head, sep]
        for r in rs:
            cfg = (r["config"] or "launcher's fixed launch").split(" w")[0]
            if r["status"] == "refused":
                cells = [cfg, r["num_warps"], r["num_stages"], r["compile_s"], "", "", "", "", f"refused: {r['error']}"]
            else:
                cells = [cfg, r["num_warps"], r["num_stages"], r["compile_s"], r["registers"],
                         f"{r['spill_store_bytes']} / {r['spill_load_bytes']}", r["stack_bytes"], r["shared_bytes"],
                         r["status"]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        sub = sum(r["compile_s"] for r in rs)
        lines += ["", f"Sum of compile seconds for this specialisation: {sub:.1f} s "
                      f"({len(rs)} compile{'s' if len(rs) != 1 else ''}).", ""]
    lines += [f"Total compile seconds, all rows: {total:.1f} s.", ""]
    mpath.write_text("\n".join(lines))
    return jpath, mpath


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "triton-compile-sm90"),
                    help="output folder (default: benchmarks/results/triton-compile-sm90)")
    ap.add_argument("--label", default=None, help="file stem of the report (default: triton<version>-sm<arch>)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    ap.add_argument("--tokens", type=int, default=8192, help="T of the recorded launches (default 8192)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    ap.add_argument("--fused-configs", default=None,
                    help="replace the fused kernel's autotune configs: 'BLOCK_T,BLOCK_D,BLOCK_H,warps,stages;...'")
    ap.add_argument("--compare", default=None, help="an earlier report's json: a before / after summary per kernel")
    a = ap.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be decorated for the GPU
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-report-")  # every compile is cold
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    wls = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in wls if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {list(WORKLOADS)}")
    fused_configs = parse_configs(a.fused_configs) if a.fused_configs else None
    label = a.label or f"triton{triton.__version__}-sm{a.arch}"
    rows = launch_rows(wls, a.tokens, a.arch, fused_configs, log=lambda s: print(s, flush=True))
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    try:
        ptxas_ver = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception:
        ptxas_ver = "unknown"
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "kernels"], capture_output=True, text=True)
    meta = dict(label=label, triton=f"{triton.__version__} ({Path(triton.__file__).parent})", ptxas=ptxas_ver,
                torch=torch.__version__, target=f"cuda sm_{a.arch} (warp 32)", tokens=a.tokens,
                workloads=", ".join(wls), shape="GELU-4L: N=32 heads, d_head=64, d_model=512, M=4 extras, W=32 writers",
                fused_configs="override: " + a.fused_configs if a.fused_configs else "the module's autotune list",
                host=f"{cpu_name()}, {os.cpu_count()} CPUs",
                kernels=f"git {git.stdout.strip() or '?'}{' + uncommitted kernels/ changes' if dirty.stdout.strip() else ''}")
    old = json.loads(Path(a.compare).read_text()) if a.compare else None
    j, m = write_report(rows, meta, Path(a.out), label, old)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
