"""Backend registry: which implementations of the contract exist here, and the "auto" choice.

Each backend module exposes ``NAME``, ``available() -> (bool, reason)`` and
``run(FusedInputs) -> FusedOutputs``; it implements the contract and nothing more.
Code outside this package reaches a backend only through this registry (`get_backend`,
`backend_module`, `available_backends`) and the scan's kernels through `erasure_fast.backends.scan_kernels`;
it never imports a backend's module itself.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Dict, NamedTuple

import torch

from .. import mkl_dispatch  # noqa: F401 (on import: oneMKL dispatch resolved before any parallel call)

_MODULES = {"torch": "torch_ref", "cpp": "cpp", "triton": "triton"}
_cache: Dict[str, ModuleType] = {}
_warned_missing: set = set()


class BackendInfo(NamedTuple):
    available: bool
    detail: str  # what it runs on when available, why not otherwise


def _module(name: str) -> ModuleType:
    if name not in _cache:
        _cache[name] = importlib.import_module(f".{_MODULES[name]}", __name__)
    return _cache[name]


def backend_module(name: str) -> ModuleType:
    """The module of backend ``name`` ("torch", "cpp", "triton"), imported on first use, whether or not
    it can run here (see `available_backends`): e.g. ``backend_module("cpp").build_info()``."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _MODULES))}; got {name!r}")
    return _module(name)


def _info(name: str) -> BackendInfo:
    try:
        ok, detail = _module(name).available()
    except Exception as e:  # an import failure is a reason, not a crash
        ok, detail = False, f"import failed: {e}"
    return BackendInfo(ok, detail)


def available_backends() -> Dict[str, BackendInfo]:
    """Every backend with whether it can run here and why (or why not)."""
    return {name: _info(name) for name in _MODULES}


def get_backend(name: str, device: torch.device, dtype: torch.dtype = None) -> ModuleType:
    """Resolve ``name`` ("auto", "torch", "cpp", "triton") for tensors on ``device`` (of ``dtype``).
    "auto": C++ on CPU, Triton on CUDA (float64 goes to the torch backend: Triton computes in fp32)."""
    if name not in ("auto", *_MODULES):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, _MODULES))}; got {name!r}")
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
        if preferred == "triton" and dtype == torch.float64:
            return _module("torch")
        info = _info(preferred) if preferred != "torch" else BackendInfo(True, "")
        if info.available:
            return _module(preferred)
        if preferred not in _warned_missing:
            _warned_missing.add(preferred)
            warnings.warn(f"erasure_fast: {preferred} backend unavailable ({info.detail}); using the torch backend", stacklevel=3)
        return _module("torch")
    ok, detail = _info(name)
    if not ok:
        raise ValueError(f"backend {name!r} is not available here: {detail}")
    module = _module(name)
    devices = getattr(module, "DEVICES", None)
    if devices is not None and device.type not in devices:
        raise ValueError(f"backend {name!r} runs on {'/'.join(devices)} tensors, but the inputs are on {device}")
    return module
