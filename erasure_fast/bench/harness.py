"""The benchmark harness: every workload x shape x size x provider, in one process and one run.

Correct before fast: before a provider is timed on a (workload, shape, size) point, the result of
its warm-up call is compared with the float64 reference (`erasure_fast.backends.torch_ref` on float64
copies of the same inputs, first ``CHECK_TOKENS`` tokens) in the canonical form of
`providers.PreparedWorkload`; a provider off by more than the dtype's tolerance is recorded as
"wrong" with its error and is not timed there (no median, no speedup). The check is outside the
timed calls and outside the memory measurement. S1 (the scan) is not checked this way: its outputs
are aggregates (quantiles, moments), which tests/test_scan*.py check against direct computation.

Per point: median and spread of wall time over repeats after a warm-up (device-synchronised on GPU),
tokens/s, peak extra memory (RSS above the pre-call baseline on CPU, sampled every 2 ms;
``max_memory_allocated`` above the baseline on GPU), speedup over TransformerLens's method, and % of
the roofline measured in the same run (matmul rate of the dtype). A provider that runs out of memory
or past the time budget is recorded with its status, not dropped.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..backends import backend_instance
from ..contract import validate
from ..optional_deps import OptionalDependencyError, import_optional, require_optional
from . import machine as mach
from . import providers as prov
from . import rounds as rounds_mod
from .workloads import SHAPES, make_inputs
from .workloads import flops as workload_flops  # `flops` is also a Point field and a parameter

# Tokens of each point compared with the reference: enough to catch a wrong kernel, cheap at 1M tokens.
CHECK_TOKENS = 2048
# Largest accepted max|ours - ref| / max|ref| by input dtype (accumulation is fp32 for bf16 / fp16).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass
class Point:
    workload: str
    shape: str
    provider: str
    n_tokens: int
    status: str = "ok"  # ok | wrong | oom | timeout | error | skipped
    times_s: List[float] = field(default_factory=list)  # one per round (interleaved), or the one call
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    q25_s: Optional[float] = None
    q75_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_extra_mib: Optional[float] = None  # during the first call
    speedup_vs_tl: Optional[float] = None  # median of the per-round ratios t_TL / t_provider
    speedup_q25: Optional[float] = None
    speedup_q75: Optional[float] = None
    roofline_pct: Optional[float] = None  # None where it would exceed 100 % (see roofline_flag)
    roofline_flag: str = ""
    rounds: int = 0
    stop: str = ""  # converged | budget | max rounds | single call
    first_call_s: Optional[float] = None
    note: str = ""
    dtype: str = "float32"  # the model's / inputs' dtype: its matmul rate is the roofline reference
    flops: Optional[float] = None  # nominal FLOPs where `workloads.flops` does not know the shape (C1 of HF families)


class _PeakRSS:
    """Peak resident memory above the baseline while the block runs (sampling thread). On CPU the
    allocator first returns freed memory to the system (glibc malloc_trim, where available), so that
    a call's allocations are not hidden in pages an earlier provider left resident."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.peak = self.base
            return self
        psutil = require_optional("psutil", "bench", "the benchmark's CPU memory sampling")
        trim_heap()
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = max(self.peak, torch.cuda.max_memory_allocated()) - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.extra = self.peak - self.base
        return False


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc")


def trim_heap() -> None:
    """glibc's malloc_trim(0): give freed heap pages back to the system (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or any(m in msg for m in _OOM_MESSAGES)


@torch.no_grad()
def reference_outputs(model, inp, workload: str, n_tokens: int) -> Dict[str, torch.Tensor]:
    """The float64 reference of a workload on the first ``n_tokens`` tokens of ``inp``, in canonical
    form: the reference backend on float64 copies of the very arguments the providers get."""
    args = prov.contract_args(model, inp, workload)
    per_token = ("z", "scale", "direction_ids", "extra_nodes")
    args = {k: v[:n_tokens] if k in per_token else v for k, v in args.items()}
    args = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
    return prov.contract_canonical(workload)(backend_instance("torch").run(validate(**args)), n_tokens)


def compare_with_reference(ours: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], tol: float) -> str:
    """Why ``ours`` is wrong ("" when it is not): per output, max|ours - ref| / max|ref| over the
    entries where the reference is finite must be <= ``tol``; a NaN / inf of ours there is wrong.
    Where the reference is NaN (no next token at a row's last position) anything goes: TransformerLens
    computes a DLA there with the token itself as target."""
    for key, r in ref.items():
        if key not in ours:
            return f"{key} missing from the output"
        o = ours[key].detach().to(r.device, torch.float64)
        if o.shape != r.shape:
            return f"{key} shape {list(o.shape)} != reference {list(r.shape)}"
        fin = torch.isfinite(r)
        if not bool(torch.isfinite(o[fin]).all()):
            return f"{key} non-finite where the reference is finite"
        if not bool(fin.any()):
            continue
        err = float((o[fin] - r[fin]).abs().max() / r[fin].abs().max().clamp_min(1e-300))
        if not err <= tol:
            return f"{key} rel err {err:.1e} > {tol:.0e}"
    return ""


def measure(fn, device, repeats: int, warmup: int = 1, budget_s: float = 120.0,
            check: Optional[Callable[[object], str]] = None) -> Point:
    """Time ``fn``: ``warmup`` calls, then ``repeats`` timed calls (0: the warm-up call is the time).

    Peak extra memory is that of the first call(s) (the warm-up, or the timed calls without one).
    ``check(result)`` -> why the result is wrong, or "": called on the last warm-up call's result
    after the memory measurement and outside the timing. A wrong result makes the point "wrong"
    with no time (its timed repeats are not run)."""
    p = Point("", "", "", 0)
    out = None
    try:
        if warmup:
            with _PeakRSS(device) as mem:
                t0 = time.perf_counter()
                for _ in range(warmup):
                    out = fn()
                mach.sync(device)
                first = time.perf_counter() - t0
            p.peak_extra_mib = mem.extra / 2**20
            if check is not None:
                why = check(out)
                if why:
                    p.status, p.note = "wrong", why
                    return p
            if first * repeats > budget_s:
                repeats = max(1, int(budget_s // max(first, 1e-9)))
        out = None
        p.times_s = [] if repeats else [first]
        with _PeakRSS(device) as timed_mem:
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = fn()
                mach.sync(device)
                p.times_s.append(time.perf_counter() - t0)
        if not warmup:
            p.peak_extra_mib = timed_mem.extra / 2**20
        p.median_s = statistics.median(p.times_s)
    except Exception as e:  # recorded, not dropped
        p.status = "oom" if _is_oom(e) else "error"
        p.note = f"{type(e).__name__}: {str(e)[:200]}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return p


def _checker(prepared: prov.PreparedWorkload, ref: Dict[str, torch.Tensor], n_tokens: int, tol: float):
    """check(result) for `measure`: the provider's canonical form of the first n tokens vs the reference."""

    def check(result) -> str:
        try:
            ours = prepared.canonical(result, n_tokens)
        except Exception as e:  # an output that cannot be put in canonical form is a wrong output
            return f"output not in canonical form ({type(e).__name__}: {str(e)[:120]})"
        return compare_with_reference(ours, ref, tol)

    return check


def _model(shape: str, device):
    """A TransformerLens 4 bridge of the shape, or -- where TransformerLens 4 is not installed (e.g. a GPU
    machine without it) -- a `ModelSpec` of random weights, for the project's own providers. A
    TransformerLens that is installed but does not import raises `OptionalDependencyError` with the
    cause: the callers refuse the workloads that need it instead of timing them without it."""
    if import_optional("transformer_lens.model_bridge.sources.native") is not None:
        from ..demo import gelu4l_shaped_bridge

        return gelu4l_shaped_bridge(seed=0, **SHAPES[shape]).to(device)
    from ..models import ModelSpec

    d = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    std = 0.8 / d["d_model"] ** 0.5
    W_O = torch.randn(d["n_layers"], d["n_heads"], d["d_head"], d["d_model"], generator=g) * std
    W_U = torch.randn(d["d_model"], d["d_vocab"], generator=g) * std
    b_O = torch.zeros(d["n_layers"], d["d_model"])
    return ModelSpec.from_weights(W_O.to(device), b_O.to(device), W_U.to(device))


def _not_timed(workload: str, shape: str, n_tokens: int, why: str, progress) -> Point:
    """The point of a workload refused before any timing: its TransformerLens reference cannot be built."""
    p = Point(workload, shape, "transformer_lens", n_tokens, status="error", note=f"not timed: {why}")
    progress(f"{workload:8s} {shape:10s} T={n_tokens:>8d} {p.provider:32s} {p.status:6s}  ({p.note})")
    return p


def first_call(prepared: prov.PreparedWorkload, device, check: Callable[[object], str]) -> Point:
    """One call of a provider, with its peak extra memory and the correctness check (outside the
    memory measurement): status ok / wrong / oom / error and the call's time."""
    p = measure(prepared.call, device, repeats=0, warmup=1, check=check)
    if p.status == "ok":
        p.first_call_s = p.times_s[0]
    return p


def _probe(device, dtype) -> Callable[[], float]:
    """The per-round matmul-rate probe (GFLOP/s) in the workload's dtype, same threads as the providers."""
    n = 4096 if device.type == "cuda" else 2048
    return lambda: mach.matmul_rate(device, dtype, n=n, repeats=3)


def _fill_from_rounds(p: Point, times: List[float], ratios: Optional[List[float]], rr: rounds_mod.RoundsResult) -> None:
    p.times_s = list(times)
    p.q25_s, p.median_s, p.q75_s = rounds_mod.quartiles(times)
    p.min_s = min(times)
    p.rounds, p.stop = len(times), rr.stop
    if ratios:
        p.speedup_q25, p.speedup_vs_tl, p.speedup_q75 = rounds_mod.quartiles(ratios)


def run_kernels(shapes, sizes, device, repeats: int, budget_s: float, providers=None, progress=print,
                points: Optional[List[Point]] = None, extra_providers: Optional[Dict[str, Callable]] = None,
                round_settings: Optional[rounds_mod.RoundSettings] = None, probes: Optional[List[dict]] = None,
                dtype: torch.dtype = torch.float32) -> List[Point]:
    """K1, K2n (cold + warm), K2f for every provider (appended to ``points`` as they finish), on a
    model and activations of ``dtype``.

    Per (workload, shape, size) point: every provider's first call (its peak memory; for K2n the cold
    time) and its check against the float64 reference; then the providers that passed are timed in
    interleaved rounds (`rounds.run_rounds`: at least ``repeats`` rounds, each after a matmul probe,
    until the per-round ratios settle or the budget ends). A provider whose first call exceeds
    ``budget_s`` is not timed at this size and not run at larger ones. ``probes`` (a list) receives
    every point's probe rates.

    ``providers``: substrings of provider names to keep (None: all; ValueError when one matches
    nothing). ``extra_providers``: {name: make} run in addition, never filtered by ``providers`` --
    a hook for tests and experiments (``make(model, inputs, workload) -> providers.PreparedWorkload``
    or None), checked against the reference and timed like the built-in ones."""
    points = [] if points is None else points
    settings = round_settings or rounds_mod.RoundSettings(min_rounds=max(1, repeats), budget_s=budget_s)
    chosen = prov.select_providers(device, providers)
    clash = sorted(set(chosen) & set(extra_providers or {}))
    if clash:
        raise ValueError(f"extra_providers {clash} clash with built-in provider names")
    chosen.update(extra_providers or {})
    for shape in shapes:
        try:
            model = _model(shape, device)
        except OptionalDependencyError as e:
            points.extend(_not_timed(w, shape, n, str(e), progress) for n in sizes for w in ("K1", "K2n", "K2f"))
            continue
        if dtype != torch.float32 and hasattr(model, "cfg"):  # a TransformerLens model (a ModelSpec is cast per call)
            model = model.to(dtype)
        dead: Dict[tuple, str] = {}
        for n in sizes:
            inp = make_inputs(shape, n, device, dtype=dtype)
            n_check = min(inp.n_tokens, CHECK_TOKENS)
            tol = TOLERANCE[inp.z.dtype]
            for workload in ("K1", "K2n", "K2f"):
                _run_point(model, inp, shape, workload, chosen, dead, device, budget_s, settings, n_check, tol,
                           points, progress, probes)
            del inp
            gc.collect()
        del model
    return points


def _run_point(model, inp, shape, workload, chosen, dead, device, budget_s, settings, n_check, tol, points, progress,
               probes) -> None:
    """One (workload, shape, size) point: first calls and checks, then the interleaved rounds."""
    ref = None  # computed when the first provider of this point needs it
    timed: Dict[str, Point] = {}
    calls: Dict[str, Callable] = {}
    for name, make in chosen.items():
        key = (workload, name)
        if name.startswith("transformer_lens") and not hasattr(model, "cfg"):
            points.append(Point(workload, shape, name, inp.n_tokens, status="skipped", note="TransformerLens 4 not installed"))
            continue
        if key in dead:
            points.append(Point(workload, shape, name, inp.n_tokens, status=dead[key], note="larger size skipped"))
            continue
        prepared = make(model, inp, workload)
        if prepared is None:  # the provider does not do this workload
            continue
        if ref is None:
            ref = reference_outputs(model, inp, workload, n_check)
        first = first_call(prepared, device, _checker(prepared, ref, n_check, tol))
        first.workload, first.shape, first.provider, first.n_tokens = workload, shape, name, inp.n_tokens
        first.dtype = str(inp.z.dtype).replace("torch.", "")
        if workload == "K2n":  # cold: the very first call on this input (tables, compilation)
            cold = Point("K2n_cold", shape, name, inp.n_tokens, status=first.status, times_s=list(first.times_s),
                         median_s=first.first_call_s, min_s=first.first_call_s, peak_extra_mib=first.peak_extra_mib,
                         rounds=1 if first.status == "ok" else 0, stop="single call", first_call_s=first.first_call_s,
                         note=first.note, dtype=first.dtype)
            points.append(cold)
        if first.status == "ok" and first.first_call_s > budget_s:
            first.status, first.note = "timeout", f"first call {first.first_call_s:.1f} s > budget {budget_s:g} s"
        if first.status != "ok":
            points.append(first)
            if first.status in ("oom", "timeout"):
                dead[key] = first.status
            progress(f"{workload:8s} {shape:10s} T={inp.n_tokens:>8d} {name:32s} {first.status:6s}  ({first.note})")
            continue
        timed[name], calls[name] = first, prepared.call
    if not calls:
        return
    reference = next((name for name in calls if name.startswith("transformer_lens")), None)
    rr = rounds_mod.run_rounds(calls, device, _probe(device, inp.z.dtype), settings, reference)
    if probes is not None:
        probes.append(dict(workload=workload, shape=shape, n_tokens=inp.n_tokens, gflops=rr.probes,
                           dtype=str(inp.z.dtype).replace("torch.", "")))
    ref_times = rr.times.get(reference) if reference else None
    for name, p in timed.items():
        if name in rr.errors:
            p.status = "oom" if any(m in rr.errors[name].lower() for m in _OOM_MESSAGES) else "error"
            p.note = rr.errors[name]
            if p.status == "oom":
                dead[(workload, name)] = "oom"
        elif rr.times[name]:
            ratios = rounds_mod.per_round_ratios(ref_times, rr.times[name]) if ref_times else None
            _fill_from_rounds(p, rr.times[name], ratios, rr)
        points.append(p)
        progress(f"{workload:8s} {shape:10s} T={inp.n_tokens:>8d} {name:32s} {p.status:6s} "
                 f"{('%.4f s' % p.median_s) if p.median_s else '':>10s}"
                 + (f"  x{p.speedup_vs_tl:.1f} [{p.speedup_q25:.1f}, {p.speedup_q75:.1f}]" if p.speedup_vs_tl else "")
                 + f"  {p.rounds} rounds ({rr.stop})" + (f"  ({p.note})" if p.status != "ok" and p.note else ""))


def run_s1(n_tokens: int, device, batch_size: int = 8, progress=print, points: Optional[List[Point]] = None,
           dtype: torch.dtype = torch.float32, overhead_rounds: int = 3) -> List[Point]:
    """S1: scan n_tokens of a synthetic corpus through a GELU-4L-shaped model: the TransformerLens
    pipeline, the bare forward through TransformerLens hooks and through the capture engine, and the
    scan on the engine (its default) and on hooks. C1: the two captures alone, as their own workload
    (FLOP rate against the run's matmul rate). Last, the scan's overhead over the engine's forward from
    ``overhead_rounds`` interleaved pairs (`_scan_over_forward`). ``dtype``: the model's (every row runs
    in it; noted on the points when it is not float32)."""
    import tempfile

    import numpy as np

    from ..capture import capture, validate_tokens
    from ..demo import demo_corpus
    from ..engine import EngineWeights, engine_capture
    from ..models import model_spec
    from ..scanning import scan

    points = [] if points is None else points
    seq = 1024
    corpus = demo_corpus(max(1, n_tokens // seq), seq)
    try:
        model = _model("gelu-4l", device)
    except OptionalDependencyError as e:
        points.append(_not_timed("S1", "gelu-4l", len(corpus) * seq, str(e), progress))
        return points
    if not hasattr(model, "cfg"):
        points.append(_not_timed("S1", "gelu-4l", len(corpus) * seq, "S1 runs on a TransformerLens 4 bridge, "
                                 "and TransformerLens 4 is not installed", progress))
        return points
    if dtype != torch.float32:
        model = model.to(dtype)
    spec = model_spec(model)
    L = spec.n_layers
    keep = tuple([f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
                 + ["ln_final.hook_scale"])

    def batches(rows=None):
        for lo in range(0, len(corpus) if rows is None else rows, batch_size):
            yield torch.from_numpy(corpus[lo:lo + batch_size]).long().to(device)

    def tl_pipeline(rows=None):
        """run_with_cache (names filter) + stack_head_results + logit_attrs + paper PR + numpy quantiles."""
        qs = []
        for toks in batches(rows):
            with torch.no_grad():
                _, cache = model.run_with_cache(toks, names_filter=lambda n: n in keep)
                stack = cache.stack_head_results(layer=-1, apply_ln=False)
                nxt = torch.cat([toks[:, 1:], toks[:, -1:]], dim=1)
                dla = cache.logit_attrs(stack, nxt)[:, :, :-1]
                mlps = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)])
                pr = prov.paper_pr(torch.cat([stack, mlps]), stack)
            qs.append(np.nanquantile(pr.reshape(-1, pr.shape[2] * pr.shape[3]).float().cpu().numpy(), [0.125, 0.25, 0.5, 0.75, 0.875], axis=0))
            qs.append(np.quantile(dla.reshape(dla.shape[0], -1).float().cpu().numpy(), [0.25, 0.5, 0.75], axis=1))
        return qs

    def bare_forward(rows=None):
        """Forward pass without unembedding (hooks capture z / MLP outputs, nothing else)."""
        for toks in batches(rows):
            capture(model, validate_tokens(toks, spec), spec)

    weights = EngineWeights.from_model(model, spec)

    def engine_forward(rows=None):
        """The same activations from the capture engine."""
        for toks in batches(rows):
            engine_capture(spec, weights, validate_tokens(toks, spec))

    def ours(mode):
        def run(rows=None):
            with tempfile.TemporaryDirectory() as tmp:
                return scan(model, corpus if rows is None else corpus[:rows], batch_size=batch_size, out_dir=tmp,
                            resume=False, progress=False, report=False, capture=mode)
        return run

    # Not checked against the reference like the kernels: the scan's outputs are aggregates
    # (histogram quantiles, moments), which tests/test_scan*.py check against direct computation; the
    # engine's activations are checked against hook capture in tests/test_engine.py.
    runs = (("C1", "transformer_lens hooks", bare_forward), ("C1", "erasure_fast engine", engine_forward),
            ("S1", "transformer_lens pipeline", tl_pipeline), ("S1", "bare forward, TL hooks (no unembed)", bare_forward),
            ("S1", "engine forward (no unembed)", engine_forward), ("S1", "erasure_fast scan (engine)", ours("engine")),
            ("S1", "erasure_fast scan (hooks)", ours("hooks")))
    _warm_up([fn for _, _, fn in runs], batch_size, device)
    for workload, name, fn in runs:
        points.append(_one_run(fn, device, workload, "gelu-4l", name, len(corpus) * seq, dtype, progress))
    points.append(_scan_over_forward(engine_forward, ours("engine"), device, overhead_rounds, len(corpus) * seq, dtype))
    progress(f"S1       gelu-4l    T={points[-1].n_tokens:>8d} {points[-1].provider:36s} {points[-1].status:6s} "
             f"{points[-1].note}")
    return points


def _warm_up(functions, rows: int, device) -> None:
    """One batch (``rows`` rows) through each function before any is timed: the first call of a process
    pays for the CUDA context, library handles, kernel selection and allocator pools, which would
    otherwise land in whichever row runs first (the first H200 run's C1 rows)."""
    for fn in functions:
        fn(rows=rows)
    mach.sync(device)


def run_c1_hf(n_tokens: int, device, families, batch_size: int = 8, progress=print,
              points: Optional[List[Point]] = None, dtype: torch.dtype = torch.float32) -> List[Point]:
    """C1 for Hugging Face families (`hf_capture`): hook capture through the bridge and the
    `hf_modules` engine on S1's corpus of ``n_tokens``, one row each, shape "<family>-512"; a family the
    engine does not cover here is recorded as skipped with the reason."""
    from ..demo import demo_corpus
    from . import hf_capture

    seq = 1024
    corpus = demo_corpus(max(1, n_tokens // seq), seq)
    points = [] if points is None else points
    for family in hf_capture.check_families(families):
        shape, tokens = f"{family}-512", len(corpus) * seq
        try:
            fns = hf_capture.capture_functions(family, device, dtype, corpus, batch_size)
        except OptionalDependencyError as e:
            points.append(_not_timed("C1", shape, tokens, str(e), progress))
            continue
        except RuntimeError as e:
            points.append(Point("C1", shape, "erasure_fast engine", tokens, status="skipped", note=str(e)))
            continue
        _warm_up(fns.values(), batch_size, device)
        for name, fn in fns.items():
            points.append(_one_run(fn, device, "C1", shape, name, tokens, dtype, progress,
                                   flops=hf_capture.forward_flops(family, tokens, seq)))
    return points


def _one_run(fn, device, workload: str, shape: str, provider: str, n_tokens: int, dtype: torch.dtype, progress,
             flops: Optional[float] = None) -> Point:
    """One timed call of an S1 / C1 row (no interleaving: each row is a whole corpus), labelled, with
    its dtype (noted when not float32) and its progress line."""
    p = measure(fn, device, repeats=1, warmup=0, budget_s=3600)
    p.workload, p.shape, p.provider, p.n_tokens, p.flops = workload, shape, provider, n_tokens, flops
    p.dtype = str(dtype).replace("torch.", "")
    if dtype != torch.float32:
        p.note = " ".join(filter(None, [p.dtype, p.note]))
    progress(f"{workload:8s} {shape:10s} T={n_tokens:>8d} {provider:36s} {p.status:6s} "
             f"{('%.1f s' % p.median_s) if p.median_s else ''}")
    return p


def _scan_over_forward(forward, scan, device, rounds: int, n_tokens: int, dtype) -> Point:
    """The scan's time over the engine's bare forward, from ``rounds`` interleaved (forward, scan)
    pairs: the per-round ratios' median cancels the slow drifts of a shared machine that separate
    single runs see. The point's times are the scan's; its note gives every ratio and their median."""
    p = Point("S1", "gelu-4l", "scan (engine) / engine forward, interleaved", n_tokens)
    ratios = []
    try:
        for _ in range(rounds):
            times = []
            for fn in (forward, scan):
                t0 = time.perf_counter()
                fn()
                mach.sync(device)
                times.append(time.perf_counter() - t0)
            p.times_s.append(times[1])
            ratios.append(times[1] / times[0])
        p.median_s = statistics.median(p.times_s)
        p.rounds, p.stop = rounds, "single call" if rounds == 1 else "max rounds"
        p.note = (f"scan / forward per round: {', '.join('%.3f' % r for r in ratios)}; median {statistics.median(ratios):.3f} "
                  f"({100 * (statistics.median(ratios) - 1):+.1f} %)")
    except Exception as e:  # recorded, not dropped
        p.status = "oom" if _is_oom(e) else "error"
        p.note = f"{type(e).__name__}: {str(e)[:200]}"
    if dtype != torch.float32:
        p.note = f"{str(dtype).replace('torch.', '')} {p.note}"
    return p


def best_rates(roof: dict, probes: Optional[List[dict]] = None) -> Dict[str, float]:
    """The run's matmul reference per dtype: the best of the start-of-run measurement and every
    in-run probe (GFLOP/s). A slower moment of the machine can lower a single measurement; the best
    one is what the hardware demonstrably reached in this run."""
    rates = dict(roof["matmul_gflops"])
    for pr in probes or []:
        if pr["gflops"]:
            key = pr.get("dtype", "float32")  # the points' dtype (results written before: float32)
            rates[key] = max(rates.get(key, 0.0), max(pr["gflops"]))
    return rates


def finish(points: List[Point], roof: dict, probes: Optional[List[dict]] = None) -> Dict[str, float]:
    """Fill tokens/s and % of the best fp32 matmul rate of the run (where the workload has a
    provider-independent FLOP count: K1, K2f). A fraction above 100 % means the reference is wrong,
    not that the provider beat the hardware: it is flagged and no percentage is given. Returns the
    rates used. Speedups come from the interleaved rounds (`run_kernels`); points recorded without
    them (one-at-a-time S1 runs, older results) get the ratio of medians."""
    rates = best_rates(roof, probes)
    tl = {(p.workload, p.shape, p.n_tokens): p for p in points if p.provider.startswith("transformer_lens") and p.status == "ok"}
    for p in points:
        if p.status != "ok" or not p.median_s:
            continue
        p.tokens_per_s = p.n_tokens / p.median_s
        ref = tl.get((p.workload, p.shape, p.n_tokens))
        one_at_a_time = p.workload in ("S1", "C1", "K2n_cold") or p.rounds == 0  # no interleaved rounds to pair
        if ref is not None and p.speedup_vs_tl is None and one_at_a_time:
            p.speedup_vs_tl = ref.median_s / p.median_s
        work = p.flops if p.flops is not None else workload_flops(p.workload, p.shape, p.n_tokens)
        p.roofline_pct, p.roofline_flag = None, ""
        rate = rates.get(p.dtype, rates["float32"]) * 1e9
        if work is not None:
            pct = 100 * work / p.median_s / rate
            if pct > 100:
                p.roofline_flag = (f"{pct:.0f} % of the best measured matmul rate: above 100 % is a measurement "
                                   "problem (the reference is too low), not a result")
            else:
                p.roofline_pct = pct
    return rates


def as_records(points: List[Point]) -> List[dict]:
    return [asdict(p) for p in points]
