"""Backend registry: which implementations of the contract exist here, and the "auto" choice.

Every backend is a subclass of `erasure_fast.backends.base.Backend` (``name``, ``available()``,
``run(FusedInputs) -> FusedOutputs`` and, where it has them, the DLA-only entry points, the DLA
table and the scan's aggregation kernels), registered here by name; the registry hands out one
instance per name (`get_backend`, `backend_instance`). Code outside this package reaches a backend
only through this registry and the scan's kernels through `erasure_fast.backends.scan_kernels`; it
never imports a backend's module itself. `backend_module` gives a backend's module for its own
settings (e.g. ``backend_module("cpp").set_num_threads(2)``).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Dict, NamedTuple

import torch

from .. import mkl_dispatch  # noqa: F401 (on import: oneMKL dispatch resolved before any parallel call)
from .base import Backend

# name -> (its module, the module and name of its Backend subclass): imported on first use
_REGISTRY = {
    "torch": ("torch_ref", "torch_ref", "TorchBackend"),
    "cpp": ("cpp", "cpp_backend", "CppBackend"),
    "triton": ("triton", "triton", "TritonBackend"),
}
_MODULES = {name: module for name, (module, _, _) in _REGISTRY.items()}
_cache: Dict[str, ModuleType] = {}
_instances: Dict[str, Backend] = {}
_warned_missing: set = set()


class BackendInfo(NamedTuple):
    available: bool
    detail: str  # what it runs on when available, why not otherwise


def _module(name: str) -> ModuleType:
    if name not in _cache:
        _cache[name] = importlib.import_module(f".{_MODULES[name]}", __name__)
    return _cache[name]


def backend_instance(name: str) -> Backend:
    """The registered `Backend` ``name`` ("torch", "cpp", "triton"), one instance per name, whether or
    not it can run here (see `available_backends`)."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _REGISTRY))}; got {name!r}")
    if name not in _instances:
        _, module, cls_name = _REGISTRY[name]
        cls = getattr(importlib.import_module(f".{module}", __name__), cls_name)
        _instances[name] = cls()
    return _instances[name]


def backend_module(name: str) -> ModuleType:
    """The module of backend ``name`` ("torch", "cpp", "triton"), imported on first use, whether or not
    it can run here (see `available_backends`): e.g. ``backend_module("cpp").build_info()``."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _MODULES))}; got {name!r}")
    return _module(name)


def _info(name: str) -> BackendInfo:
    try:
        ok, detail = backend_instance(name).available()
    except Exception as e:  # an import failure is a reason, not a crash
        ok, detail = False, f"import failed: {e}"
    return BackendInfo(ok, detail)


def available_backends() -> Dict[str, BackendInfo]:
    """Every backend with whether it can run here and why (or why not)."""
    return {name: _info(name) for name in _MODULES}


def get_backend(name: str, device: torch.device, dtype: torch.dtype = None) -> Backend:
    """Resolve ``name`` ("auto", "torch", "cpp", "triton") to its `Backend` for tensors on ``device``
    (of ``dtype``).
    "auto": C++ on CPU, Triton on CUDA (float64 goes to the torch backend: Triton computes in fp32)."""
    if name not in ("auto", *_MODULES):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, _MODULES))}; got {name!r}")
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
        if preferred == "triton" and dtype == torch.float64:
            return backend_instance("torch")
        info = _info(preferred) if preferred != "torch" else BackendInfo(True, "")
        if info.available:
            return backend_instance(preferred)
        if preferred not in _warned_missing:
            _warned_missing.add(preferred)
            warnings.warn(f"erasure_fast: {preferred} backend unavailable ({info.detail}); using the torch backend", stacklevel=3)
        return backend_instance("torch")
    ok, detail = _info(name)
    if not ok:
        raise ValueError(f"backend {name!r} is not available here: {detail}")
    impl = backend_instance(name)
    devices = impl.devices
    if devices is not None and device.type not in devices:
        raise ValueError(f"backend {name!r} runs on {'/'.join(devices)} tensors, but the inputs are on {device}")
    return impl
