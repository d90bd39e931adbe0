"""What machine a benchmark ran on, and its measured roofline: matmul rate per dtype, copy bandwidth."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def describe() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "host": platform.node(),
        "cpu": cpu,
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
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    from importlib import metadata

    try:
        info["transformer_lens"] = metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        pass
    return info


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


def roofline(device: torch.device) -> dict:
    """Measured matmul rate per dtype (GFLOP/s) and copy bandwidth (GB/s) of ``device``.

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
    return {"matmul_gflops": rates, "copy_gbps": copy_bandwidth(device, 1024 if device.type == "cuda" else 256)}
