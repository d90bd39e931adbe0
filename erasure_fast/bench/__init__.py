"""Benchmark harness (`erasure-fast bench`): workloads K1, K2, S1 for every provider, roofline, report.

`run` checks its arguments here, then measures in a child process (``python -m erasure_fast.bench``,
see `child`): the child caps its own address space, switches TF32 for the roofline and registers
extra shapes, so a library call leaves the caller's process as it found it. `validate_arguments` is
the same check on its own (a CLI maps its ValueError to a usage error).
"""

from __future__ import annotations

import collections
import json
import math
import numbers
import os
import subprocess
import sys
import tempfile
import threading

import torch

from ..paths import check_output_dir
from .providers import select_providers
from .workloads import SHAPES

CPU_SIZES = [1024, 4096, 8192, 16384, 65536]
GPU_SIZES = [1024, 8192, 65536, 262144, 1048576]
# Keys of a shape definition (workloads.SHAPES, extra_shapes), each a positive int.
SHAPE_KEYS = ("n_layers", "n_heads", "d_head", "d_model", "d_mlp", "d_vocab", "n_ctx")
# Lines of the child's stderr quoted in the error when it fails.
STDERR_TAIL_LINES = 30


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_extra_shapes(extra_shapes) -> dict:
    if extra_shapes is None:
        return {}
    if not isinstance(extra_shapes, dict):
        raise ValueError(f"extra_shapes must be a dict {{name: {{{', '.join(SHAPE_KEYS)}}}}}, got {type(extra_shapes).__name__}")
    out = {}
    for name, dims in extra_shapes.items():
        if not isinstance(name, str) or not name or name in SHAPES:
            raise ValueError(f"extra_shapes: name {name!r} must be a new, non-empty string "
                             f"(built-in shapes: {sorted(SHAPES)})")
        if not isinstance(dims, dict) or set(dims) != set(SHAPE_KEYS) or not all(_is_int(v) and v > 0 for v in dims.values()):
            raise ValueError(f"extra_shapes[{name!r}] must have exactly the keys {list(SHAPE_KEYS)}, each a positive int; got {dims!r}")
        if dims["d_vocab"] < 2:
            raise ValueError(f"extra_shapes[{name!r}]: d_vocab must be >= 2 (K2f needs a token pair), got {dims['d_vocab']}")
        out[name] = {k: int(dims[k]) for k in SHAPE_KEYS}
    return out


def _check_device(device) -> torch.device:
    cuda = torch.cuda.is_available()
    choices = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else [])
    if device is None:
        return torch.device("cuda" if cuda else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device; choose from {choices}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda" and cuda and (dev.index is None or dev.index < torch.cuda.device_count()):
        return dev
    raise ValueError(f"device {device!r} does not exist here; choose from {choices}")


def _check_out_dir(out_dir) -> str:
    """A folder the child can write its report to; nothing is created here (a refused run leaves no trace)."""
    try:
        return os.path.abspath(check_output_dir(out_dir, "out_dir", create=False))
    except TypeError as e:
        raise ValueError(str(e)) from None


S1_DTYPES = ("float32", "bfloat16", "float16")
KERNEL_DTYPES = ("float32", "bfloat16", "float16")

def validate_arguments(out_dir: str = "benchmarks/results", *, device: str = None, shapes=("gelu-4l", "gpt2-small"),
                       sizes=None, repeats: int = 5, budget_s: float = 60.0, s1_tokens: int = 0, providers=None,
                       command: str = "", extra_shapes: dict = None, round_budget_s: float = None,
                       s1_dtype: str = "float32", c1_families=(), dtype: str = "float32") -> dict:
    """Check every argument of `run` before any work; returns the settings the child process gets
    (defaults resolved: device, sizes). Raises ValueError naming the argument and the valid choices.
    Creates nothing and starts nothing."""
    extra = _check_extra_shapes(extra_shapes)
    known = sorted(SHAPES) + sorted(extra)
    shapes = [shapes] if isinstance(shapes, str) else list(shapes)
    if not shapes:
        raise ValueError(f"shapes is empty; choose from {known}")
    unknown = [s for s in shapes if s not in known]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; choose from {known}")
    if sizes is not None:
        sizes = list(sizes)
        if not sizes or not all(_is_int(n) and n > 0 for n in sizes):
            raise ValueError(f"sizes must be a non-empty list of positive int token counts, got {sizes!r}")
    if not _is_int(repeats) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1 (the least number of timing rounds per point), got {repeats!r}")
    if not _is_number(budget_s) or not math.isfinite(budget_s) or budget_s <= 0:
        raise ValueError(f"budget_s must be a finite number of seconds > 0, got {budget_s!r}")
    if round_budget_s is not None and (not _is_number(round_budget_s) or not math.isfinite(round_budget_s)
                                       or round_budget_s <= 0):
        raise ValueError(f"round_budget_s must be a finite number of seconds > 0 or None, got {round_budget_s!r}")
    if not _is_int(s1_tokens) or s1_tokens < 0:
        raise ValueError(f"s1_tokens must be an int >= 0 (0: no S1), got {s1_tokens!r}")
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(KERNEL_DTYPES)}, got {dtype!r}")
    if s1_dtype not in S1_DTYPES:
        raise ValueError(f"s1_dtype must be one of {', '.join(S1_DTYPES)}, got {s1_dtype!r}")
    from .hf_capture import check_families

    c1_families = check_families(c1_families)
    if c1_families and not s1_tokens:
        raise ValueError(f"c1_families {c1_families} run on S1's corpus: give s1_tokens > 0 too")
    dev = _check_device(device)
    if providers is not None:
        providers = [providers] if isinstance(providers, str) else list(providers)
        select_providers(dev, providers)  # raises ValueError listing the available names
    path = _check_out_dir(out_dir)
    if not isinstance(command, str):
        raise ValueError(f"command must be a string, got {type(command).__name__}")
    default_sizes = GPU_SIZES if dev.type == "cuda" else CPU_SIZES
    return dict(out_dir=path, device=str(dev), shapes=shapes, sizes=[int(n) for n in (sizes or default_sizes)],
                repeats=int(repeats), budget_s=float(budget_s), s1_tokens=int(s1_tokens), s1_dtype=s1_dtype, dtype=dtype,
                c1_families=c1_families, providers=providers,
                command=command or " ".join(sys.argv), extra_shapes=extra,
                round_budget_s=float(budget_s if round_budget_s is None else round_budget_s), origin_cwd=os.getcwd())


def child_environment() -> dict:
    """The environment of the measuring child: it imports the very copy of erasure_fast this process
    runs, from a working directory of its own (with the caller's cwd first on sys.path, a source
    checkout there, which has no compiled extension, would shadow an installed package in the child
    only). So the folder that holds the package goes first on PYTHONPATH -- that folder, not the
    package's own: there, the package's subpackages (``kernels``, ``models``, ...) would shadow
    top-level distributions of the same name (transformers imports the ``kernels`` distribution)."""
    search_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return dict(os.environ, PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([search_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def _run_child(settings: dict) -> tuple:
    """Run ``python -m erasure_fast.bench SETTINGS`` and pass its stdout / stderr through to ours as
    they come (progress lines); returns (exit code, last lines of its stderr)."""
    cmd = [sys.executable, "-m", __name__, json.dumps(settings)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            bufsize=1, env=child_environment(), cwd=os.path.dirname(settings["manifest"]))
    tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)

    def forward_stderr():
        for line in proc.stderr:
            tail.append(line)
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=forward_stderr, daemon=True)
    reader.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted here: do not leave the child measuring on its own
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
    return rc, "".join(tail)


def run(out_dir: str = "benchmarks/results", *, device: str = None, shapes=("gelu-4l", "gpt2-small"), sizes=None,
        repeats: int = 5, budget_s: float = 60.0, s1_tokens: int = 0, providers=None, command: str = "",
        extra_shapes: dict = None, round_budget_s: float = None, s1_dtype: str = "float32", c1_families=(),
        dtype: str = "float32") -> dict:
    """Run the benchmark in a child process and write the report; returns {"meta", "results", "files"}.

    Args:
        out_dir: directory of the report (<machine>-<date>.json / .csv / .md / .png); created if needed.
        device: "cpu" or "cuda[:i]" (default: CUDA when available).
        shapes: names in `workloads.SHAPES` (or ``extra_shapes``).
        sizes: token counts per point (default CPU_SIZES / GPU_SIZES).
        repeats: the least number of interleaved timing rounds per point (>= 1; `rounds`).
        budget_s: time budget: a provider whose first call takes longer is not timed at this size nor
            run at larger ones.
        round_budget_s: wall time of one point's interleaved rounds (default: budget_s).
        s1_tokens: also run the scan workload S1 on this many tokens (0: not).
        s1_dtype: the model's dtype in S1 / C1: "float32", "bfloat16" or "float16" (GPU).
        dtype: the model's and activations' dtype in K1 / K2 ("float32", "bfloat16", "float16"); the
            roofline reference is the matmul rate of that dtype.
        c1_families: Hugging Face families (`hf_capture.HF_FAMILIES`: "llama", "gpt_neox", "gemma2")
            whose capture (bridge hooks vs the hf_modules engine) C1 also times on S1's corpus.
        providers: substrings of provider names to keep (None: all; each must match one).
        command: the command line recorded in the report (default: this process's argv).
        extra_shapes: {name: {n_layers, n_heads, d_head, d_model, d_mlp, d_vocab, n_ctx}} further
            shapes defined for this run only (tests use a tiny one).

    Raises ValueError (bad argument, before anything runs) or RuntimeError (the child process failed:
    its exit code and the end of its stderr)."""
    settings = validate_arguments(out_dir, device=device, shapes=shapes, sizes=sizes, repeats=repeats,
                                  budget_s=budget_s, s1_tokens=s1_tokens, providers=providers, command=command,
                                  extra_shapes=extra_shapes, round_budget_s=round_budget_s, s1_dtype=s1_dtype, dtype=dtype,
                                  c1_families=c1_families)
    with tempfile.TemporaryDirectory(prefix="erasure-fast-bench-") as tmp:
        settings["manifest"] = os.path.join(tmp, "manifest.json")
        rc, stderr_tail = _run_child(settings)
        if rc != 0 or not os.path.exists(settings["manifest"]):
            raise RuntimeError(f"benchmark process failed (exit code {rc}); end of its stderr:\n{stderr_tail.rstrip()}")
        with open(settings["manifest"]) as f:
            files = json.load(f)["files"]
    with open(files["json"]) as f:
        data = json.load(f)
    return dict(meta=data["meta"], results=data["results"], files=files)
