"""What machine a benchmark ran on, and its measured roofline: matmul rate per dtype, copy bandwidth."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Optional

import torch

from ..optional_deps import OptionalDependencyError, import_optional


# The x86-64 vector extensions that decide which kernel paths can run, by /proc/cpuinfo flag.
_ISA_FLAGS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512F"), ("avx512bw", "AVX-512BW"),
              ("avx512vl", "AVX-512VL"), ("avx512_vnni", "AVX-512VNNI"), ("avx512_bf16", "AVX-512BF16"),
              ("avx512_fp16", "AVX-512FP16"), ("amx_tile", "AMX"), ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))


def _cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name : value`` of /proc/cpuinfo (None where unreadable or absent)."""
    text = _read("/proc/cpuinfo")
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The vector extensions of this CPU that the kernels can use, e.g. "AVX2 FMA AVX-512F ... AMX-BF16";
    "" where /proc/cpuinfo lists none of them (another architecture, or no /proc)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return " ".join(label for flag, label in _ISA_FLAGS if flag in flags)


def describe() -> dict:
    from ..backends import available_backends

    info = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpp_backend": available_backends()["cpp"].detail,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        triton = import_optional("triton")
        if triton is not None:
            info["triton"] = triton.__version__
    except OptionalDependencyError as e:  # recorded with its cause
        info["triton"] = str(e)
    from importlib import metadata

    try:
        info["transformer_lens"] = metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        pass
    return info


def cpu_line(info: dict) -> str:
    """The CPU facts of a `describe` result in one line, for every result header: model, ISA, cores,
    torch threads and the C++ kernel's build (older results lack the last two)."""
    isa = info.get("cpu_isa")
    return (f"CPU {info['cpu']}" + (f" ({isa})" if isa else " (ISA not recorded)" if isa is None else " (no x86-64 vector extensions)")
            + f", {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)"
            + (f"; C++ kernel: {info['cpp_backend']}" if info.get("cpp_backend") else ""))


def machine_label(info: dict) -> str:
    if "gpu" in info:
        return info["gpu"].replace("NVIDIA ", "").replace(" ", "-")
    return f"cpu{info['cores']}-" + "".join(c for c in info["cpu"].split("@")[0] if c.isalnum())[:24]


def sync(device):
    """Wait for the device's queued work (no-op on CPU), so wall time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, repeats: int = 5, warmup: int = 1) -> list:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of an n^3 matmul (2 n^3 FLOPs) in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    times = time_call(lambda: a @ b, device, repeats=repeats, warmup=2)
    return 2 * n**3 / statistics.median(times) / 1e9


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Measured GB/s of a large tensor copy (bytes read + bytes written)."""
    src = torch.empty(mib * 2**20 // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def roofline(device: torch.device, extra_dtypes=()) -> dict:
    """Measured matmul rate per dtype (GFLOP/s) and copy bandwidth (GB/s) of ``device``: float32, on
    CUDA also tf32 / bfloat16 / float16, and every dtype of ``extra_dtypes``.

    On CUDA the fp32 rate is measured with TF32 off and the TF32 rate with it on; the process's
    ``allow_tf32`` setting is restored afterwards (the benchmark runs this in its own process, but
    the function must not leave a changed global behind wherever it is called)."""
    rates = {"float32": matmul_rate(device, torch.float32)}
    if device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            rates["float32"] = matmul_rate(device, torch.float32, n=8192)
            torch.backends.cuda.matmul.allow_tf32 = True
            rates["tf32"] = matmul_rate(device, torch.float32, n=8192)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        rates["bfloat16"] = matmul_rate(device, torch.bfloat16, n=8192)
        rates["float16"] = matmul_rate(device, torch.float16, n=8192)
    for dtype in extra_dtypes:
        key = str(dtype).replace("torch.", "")
        if key not in rates:
            rates[key] = matmul_rate(device, dtype)
    return {"matmul_gflops": rates, "copy_gbps": copy_bandwidth(device, 1024 if device.type == "cuda" else 256)}


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _git_commit(where: Optional[str]) -> Optional[str]:
    """HEAD of the git checkout at ``where`` (with "-dirty" for uncommitted changes), if any."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=where)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=where).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def busy_fraction(seconds: float = 1.0) -> Optional[float]:
    """Share of all CPU time spent busy (not idle / iowait) over the next ``seconds``, from /proc/stat
    (None where unreadable). Taken while the benchmark itself waits, it is what others are using."""
    def sample():
        text = _read("/proc/stat")
        if not text:
            return None
        fields = [int(x) for x in text.splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields)

    a = sample()
    time.sleep(seconds)
    b = sample()
    if a is None or b is None or b[1] == a[1]:
        return None
    return 1.0 - (b[0] - a[0]) / (b[1] - a[1])


def conditions(git_dir: Optional[str] = None) -> dict:
    """What the machine was doing and running: the CPU share others used during one idle second,
    load averages, CPU frequency governor (where readable), thread counts, library versions and the
    git commit of ``git_dir``."""
    from importlib import metadata

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    versions = {}
    for pkg in ("erasure_fast", "torch", "transformer-lens", "triton", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    threads = {"torch": torch.get_num_threads(), "ERASURE_FAST_NUM_THREADS": os.environ.get("ERASURE_FAST_NUM_THREADS"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    from ..backends import backend_instance

    try:
        threads["cpp"] = backend_instance("cpp").build_info().get("max_threads")
    except RuntimeError as e:  # the extension is optional: its absence is recorded with the reason
        threads["cpp"] = str(e)
    return dict(busy_fraction=busy_fraction(), loadavg=load,
                governor=_read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "unreadable",
                threads=threads, versions=versions, git_commit=_git_commit(git_dir))
