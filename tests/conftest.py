"""Shared fixtures: TransformerLens models of either major version, error bookkeeping."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. Triton reads TRITON_INTERPRET when a
# kernel is decorated (the first import of erasure_fast.kernels), so it is set here, before any test
# module is imported; on a GPU machine the kernels stay compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TL_VERSION = metadata.version("transformer-lens")
TL_MAJOR = int(TL_VERSION.split(".")[0])

GELU_4L = dict(d_model=512, n_layers=4, n_heads=8, d_head=64, d_mlp=2048, d_vocab=48262, n_ctx=1024)

# Largest observed error per (check, dtype, backend), printed at the end and written to a JSON file.
_ERRORS: dict = {}


def cpu_paths_here() -> list:
    """The C++ kernel paths this CPU runs (`erasure_fast.backends.cpp.cpu_paths`), most portable
    first; [] without the extension."""
    from erasure_fast.backends import cpp

    try:
        return [name for name, p in cpp.cpu_paths().items() if p["runs_here"]]
    except RuntimeError:
        return []


def with_cpu_paths(backends) -> list:
    """``backends`` with "cpp" replaced by "cpp@<path>" for every kernel path this CPU runs, so a
    parametrized test runs each path (`on_backend` selects it)."""
    out = []
    for b in backends:
        out += [f"cpp@{p}" for p in cpu_paths_here()] or [b] if b == "cpp" else [b]
    return out


@contextlib.contextmanager
def on_backend(name: str):
    """Yields the backend name of ``name`` ("cpp@avx2" -> "cpp") with its kernel path selected for
    the block (the default path again afterwards)."""
    backend, _, path = name.partition("@")
    if not path:
        yield backend
        return
    from erasure_fast.backends import cpp

    cpp.set_cpu_path(path)
    try:
        yield backend
    finally:
        cpp.set_cpu_path(None)


@pytest.fixture(params=cpu_paths_here() or [None])
def each_cpu_path(request):
    """Runs a test once per C++ kernel path this CPU runs, with that path selected (the fastest
    afterwards); use with ``pytestmark = pytest.mark.usefixtures("each_cpu_path")``."""
    with on_backend(f"cpp@{request.param}" if request.param else "cpp"):
        yield request.param


# The amx path's bfloat16 kernel splits head outputs into two bf16 parts, x = hi + lo + e: bf16 keeps 8
# significant bits, so |lo| <= 2^-8 |x| and |e| <= 2^-16 |x|, and a product keeps hi hi + hi lo + lo hi,
# leaving out up to 3 x 2^-16 (4.6e-5) of |a| |b| (csrc/amx_kernels.cpp; 2.3e-5 observed): its
# tolerance against the float64 reference and against the other paths.
TOL_AMX_BF16 = 5e-5


def bitwise_equal(x, y) -> bool:
    """Whether the arrays of x and y (None entries skipped) hold the same bytes."""
    import numpy as np

    return all(np.array_equal(np.asarray(p).view(np.uint8), np.asarray(q).view(np.uint8))
               for p, q in zip(x, y) if p is not None)


def small_public_case(workload: str, dtype, seed: int) -> dict:
    """`fused_attribution` keyword arguments of a small random K1 / K2n / K2f call (61 tokens, 7 heads,
    tokens without a target among the gathered ones), for the kernels' checks against the contract."""
    g = torch.Generator().manual_seed(seed)
    T, N, H, D, M, K = 61, 7, 24, 40, 3, 9

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    kw = dict(z=rnd(T, N, H), W_O=rnd(N, H, D), directions=rnd(K, D),
              scale=torch.rand(T, generator=g, dtype=torch.float64).to(dtype) + 0.5)
    if workload == "K1":
        kw.update(writers=list(range(N)), extra_nodes=rnd(T, M, D), direction_ids=torch.randint(-1, K, (T,), generator=g))
    elif workload == "K2n":
        kw.update(writers=[], direction_ids=torch.randint(-1, K, (T,), generator=g), with_norms=False)
    else:
        kw.update(writers=[], with_norms=False)
    return kw


def record_error(check: str, dtype, backend: str, err: float) -> None:
    key = f"{check} | {str(dtype).replace('torch.', '')} | {backend}"
    _ERRORS[key] = max(_ERRORS.get(key, 0.0), float(err))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| over entries where ref is finite; NaN patterns must agree."""
    ours = ours.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), "NaN pattern differs"
    fin = torch.isfinite(ref)
    assert torch.isfinite(ours[fin]).all(), "non-finite value where the reference is finite"
    if not fin.any():
        return 0.0
    denom = ref[fin].abs().max().clamp_min(1e-300)
    return float((ours[fin] - ref[fin]).abs().max() / denom)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The upstream packages whose behaviour the tests state facts about, reported in every run's header.
UPSTREAM = ("torch", "transformer-lens", "transformers", "nnsight", "triton", "numpy")
# `make test-latest` sets this: the run is on the newest upstream releases, not on the lock.
DRIFT_REPORT = os.environ.get("EF_UPSTREAM_REPORT")
_FINDINGS: list = []  # upstream facts that no longer hold (drift runs only)


def load_tool(name: str):
    """A module of the repository's tools/ folder (not part of the package), e.g. "upstream"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_versions() -> dict:
    """{canonical distribution name: version} of this environment."""
    canonical = load_tool("upstream").canonical
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def lock_path() -> str:
    """The lock `make test` installs this environment from: TransformerLens 4's or 3's."""
    return os.path.join(REPO, "requirements", "tl4.lock" if TL_MAJOR >= 4 else "tl3.lock")


def upstream_fact(holds: bool, finding: str) -> None:
    """A fact about an upstream package (measured on the locked versions: a refusal, a failure of
    TransformerLens the project works around). Where it no longer holds, ``finding`` says what changed
    and what to do (e.g. "this refusal can be lifted"): a failure on the lock, a line of the drift
    report under `make test-latest` (the run goes on)."""
    if holds:
        return
    if DRIFT_REPORT:
        _FINDINGS.append(dict(test=os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], finding=finding))
        return
    versions = installed_versions()
    here = ", ".join(f"{p} {versions.get(p, '-')}" for p in UPSTREAM)
    pytest.fail(f"{finding} [upstream here: {here}; `make test` installs {os.path.relpath(lock_path(), REPO)}]",
                pytrace=False)


def machine_facts() -> dict:
    """The CPU (model, ISA, the C++ kernel's build) and the upstream versions of this run."""
    from erasure_fast.bench import machine

    versions = installed_versions()
    return dict(cpu=machine.cpu_line(machine.describe()), upstream={p: versions.get(p) for p in UPSTREAM})


def pytest_report_header(config):
    facts = machine_facts()
    return [facts["cpu"], "upstream: " + ", ".join(f"{p} {v or '-'}" for p, v in facts["upstream"].items())
            + (" (newest releases: drift run)" if DRIFT_REPORT else "")]


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.section("machine and upstream versions of this run")  # shown under -q too, unlike the header
    for line in pytest_report_header(None):
        terminalreporter.write_line(line)
    if DRIFT_REPORT:  # written even when empty: the drift report tells a finished run from a crashed one
        write_json(DRIFT_REPORT, dict(machine_facts(), findings=_FINDINGS))
        terminalreporter.section(f"upstream facts that changed ({len(_FINDINGS)})")
        for item in _FINDINGS:
            terminalreporter.write_line(f"{item['test']}: {item['finding']}")
    if not _ERRORS:
        return
    terminalreporter.section(f"largest observed errors (relative to max |reference|), TransformerLens {TL_VERSION}")
    for key in sorted(_ERRORS):
        terminalreporter.write_line(f"{_ERRORS[key]:.3e}  {key}")
    path = os.environ.get("EF_ERROR_REPORT")
    if path:
        write_json(path, dict(machine_facts(), transformer_lens=TL_VERSION, errors=_ERRORS))


def _randomize_vectors(model, seed: int) -> None:
    """Random LN weights/biases and biases, so unprocessed and processed models really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype).to(p.device)
                p.add_(0.2 * noise)


def build_model(*, n_layers, n_heads, d_head, d_model, d_mlp, d_vocab, n_ctx=64, compat=False,
                dtype=torch.float32, seed=0, normalization_type="LN"):
    """A TransformerLens model of the installed major version: TL 4 `TransformerBridge.boot_native`,
    TL 3 `HookedTransformer`; ``compat`` = processed weights (fold_ln, centring)."""
    if TL_MAJOR >= 4:
        import transformer_lens.model_bridge.sources.native  # noqa: F401 (registers boot_native)
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        cfg = TransformerBridgeConfig(
            d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp,
            d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu", normalization_type=normalization_type,
            positional_embedding_type="standard", seed=seed,
        )
        model = TransformerBridge.boot_native(cfg)
        if dtype != torch.float32:
            model = model.to(dtype)
        _randomize_vectors(model, seed)
        if compat:
            model.enable_compatibility_mode(disable_warnings=True)
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp,
            d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu", normalization_type=normalization_type,
            positional_embedding_type="standard", seed=seed, dtype=dtype,
        )
        model = HookedTransformer(cfg)
        _randomize_vectors(model, seed)
        if compat:
            model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tl_major() -> int:
    return TL_MAJOR


def write_tl_checkpoint(path, dims: dict, seed: int = 0, fmt: str = "pth", name: str = "model_final.pth") -> dict:
    """A small checkpoint in the layout of the NeelNanda/* repos: TL-style config.json and weights
    in HookedTransformer naming (``*.pth`` state dict or ``model.safetensors``). Returns the weights."""
    from erasure_fast.demo import random_tl_state_dict

    os.makedirs(path, exist_ok=True)
    sd = random_tl_state_dict(dims, seed)
    cfg = dict(dims, act_fn="gelu", normalization="LN", attn_only=False, positional_embedding_type="standard",
               tokenizer_name=None, model_name="fake-gelu")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if fmt == "pth":
        torch.save(sd, os.path.join(path, name))
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    return sd


def run_cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    """``python -m erasure_fast.cli *args`` in a child process (text output captured; ``env`` entries
    added to this process's environment)."""
    cmd = [sys.executable, "-m", "erasure_fast.cli", *map(str, args)]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, **kw)


@pytest.fixture
def cpp_last_path():
    """A function returning which path the C++ backend's last call on this thread took ('fused',
    'dla_fixed', 'dla_unique (unique=n)', 'dla_table (unique=n)'): the backend's private seam
    ``_last_path``, which no public signature carries."""
    from erasure_fast.backends import cpp

    return lambda: getattr(cpp._last_path, "value", "")
