"""The installed module on the older x86-64 CPUs it dispatches for, run under qemu's user-mode
emulator (Debian's qemu-user, which `make test` installs): Python runs with the cpuid of the named
CPU model, and an instruction that CPU lacks kills the process with SIGILL.

- Haswell (AVX2, FMA, F16C; no AVX-512): the module selects the avx2 path and refuses the AVX-512
  ones, naming the features the CPU lacks;
- Nehalem (SSE4.2; no AVX): the portable path.

On each, the module is loaded, its paths listed and every kernel family called, and a subset of the
C++ tests runs there: against the float64 oracle, the paths that CPU runs against each other, the
kernels' finiteness checks and the scan aggregation. With EF_EMULATED_TESTS=all (`make test-emulated`)
every C++ test runs there instead, and the C++ backend's TransformerLens parity tests. Speed means
nothing under emulation and is not measured here."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys

import pytest

from erasure_fast.backends import cpp

_ok, _why = cpp.available()
pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the kernel paths are x86-64's"),
    pytest.mark.skipif(not _ok, reason=f"cpp backend unavailable: {_why}"),
]

QEMU = os.environ.get("QEMU_X86_64", "qemu-x86_64")
# qemu's CPU model -> (the path the module must select there, torch's own reading of that CPU)
CPUS = {"Haswell-noTSX": ("avx2", "AVX2"), "Nehalem": ("portable", "DEFAULT")}
# The C++ tests run under emulation by `make test`.
SUBSET = " or ".join([
    "test_paths_listed_in_order_and_fastest_selected", "test_set_cpu_path_selects_it",
    "test_path_this_cpu_cannot_run_is_refused", "test_fused_kernel_agrees_across_paths",
    "test_dla_only_paths_agree_across_paths", "test_gathered_dla_same_bits",
    "test_scan_aggregation_identical_across_paths", "test_null_dots_agree_across_paths",
    "test_half_inputs_accumulate_in_fp32", "test_public_entry_point_and_auto",
    "test_thread_count_independent_bitwise", "test_dla_only_path_half_inputs",
    "test_lazy_table_builds_rows_on_demand", "test_public_error_names_the_first_input",
    "test_kernel_reports_the_first_nonfinite_output", "test_compiled_batch_equals_the_reference",
])
CPP_TESTS = ["test_backend_cpp.py", "test_aggregate_kernel.py", "test_cpu_paths.py", "test_activation_checks.py",
             "test_output_checks.py"]
# EF_EMULATED_TESTS=all: every C++ test (but the benchmarks' smoke runs) and the cpp parity tests.
ALL_TESTS = os.environ.get("EF_EMULATED_TESTS") == "all"
SELECTION = ([*CPP_TESTS, "test_parity_tl.py", "-k", "not benchmark_runs and (not test_parity_tl or cpp)"]
             if ALL_TESTS else [*CPP_TESTS, "-k", SUBSET])

_PROBE = """
import json, torch
from erasure_fast.backends import cpp
from erasure_fast.contract import fused_attribution
info = cpp.build_info()
g = torch.Generator().manual_seed(0)
z, W_O = torch.randn(9, 3, 5, generator=g), torch.randn(3, 5, 7, generator=g)
dirs, scale = torch.randn(4, 7, generator=g), torch.rand(9, generator=g) + 0.5
ids = torch.randint(0, 4, (9,), generator=g)
out = fused_attribution(z, W_O, dirs, scale, [0, 2], direction_ids=ids, backend="cpp")
dla = cpp.dla_gathered(None, z, scale, ids, W_O=W_O, directions=dirs)
ref = fused_attribution(z.double(), W_O.double(), dirs.double(), scale.double(), [0, 2], direction_ids=ids,
                        backend="torch")
err = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())
print(json.dumps(dict(torch=torch.backends.cpu.get_cpu_capability(), paths=cpp.cpu_paths(),
                      selected=info["cpu_path"], best=info["best_cpu_path"], simd=info["simd"],
                      errors=[err(out.dla, ref.dla), err(out.dots, ref.dots), err(dla, ref.dla)])))
"""


def _emulated(model: str, args: list, timeout: int) -> subprocess.CompletedProcess:
    """``python *args`` under qemu as CPU ``model``, from tests/, with this environment less the
    reports of the enclosing run and any forced kernel path."""
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} not found: install Debian's qemu-user (`make qemu-user`; `make test` does) "
                    "or name the binary in QEMU_X86_64")
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("EF_") and k.endswith("_REPORT")) and k != cpp.ENV_CPU_PATH}
    return subprocess.run([QEMU, "-cpu", model, sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))


def _failure(model: str, out: subprocess.CompletedProcess) -> str:
    """Why the emulated process failed: the signal that killed it (SIGILL: an instruction the CPU
    lacks) or its exit status, and the end of its output without qemu's notes on the CPU model."""
    how = (f"killed by {signal.Signals(-out.returncode).name}" if out.returncode < 0
           else f"exit status {out.returncode}")
    lines = [x for x in (out.stdout + out.stderr).splitlines() if "TCG doesn't support" not in x]
    return f"{how} under {model}:\n" + "\n".join(lines[-40:])


@pytest.mark.parametrize("model", list(CPUS))
def test_module_selects_the_cpus_fastest_path_and_its_kernels_run(model):
    want, torch_reads = CPUS[model]
    out = _emulated(model, ["-c", _PROBE], timeout=600)
    assert out.returncode == 0, _failure(model, out)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] == torch_reads, got  # the emulator really gives that CPU
    assert got["selected"] == got["best"] == want and got["simd"] == got["paths"][want]["simd"], got
    names = list(got["paths"])
    for name, p in got["paths"].items():
        runs = names.index(name) <= names.index(want)
        assert p["runs_here"] == (runs and p["compiled"]), (name, p)
        if p["compiled"] and not runs:
            assert p["missing"], (name, p)
    if got["paths"]["avx512"]["compiled"]:
        assert "avx512f" in got["paths"]["avx512"]["missing"]
    if want == "portable" and got["paths"]["avx2"]["compiled"]:
        assert "avx2" in got["paths"]["avx2"]["missing"]
    assert all(e <= 1e-5 for e in got["errors"]), got["errors"]  # fused DLA, dots, DLA-only: fp32 vs float64


@pytest.mark.parametrize("model", list(CPUS))
def test_cpp_tests_pass_on_the_emulated_cpu(model):
    out = _emulated(model, ["-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *SELECTION],
                    timeout=3600 if ALL_TESTS else 900)
    assert out.returncode == 0, _failure(model, out)
    summary = out.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 50, summary
