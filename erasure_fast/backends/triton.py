"""The Triton backend: fused GPU kernels in ``erasure_fast.kernels`` (sources in ``kernels/``).

Implements the contract (`erasure_fast.contract`) on CUDA tensors, and on CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``: correctness checks only, slow). Dispatch:

* no writers (W = 0): `kernels.dla_table.dla_only` -- DLA and head norms in head space, nothing
  formed in d_model (extra nodes, if any, only need their squared norms: one torch reduction);
* otherwise `kernels.fused_attribution.fused_attribution` -- one pass over z forming every head's
  output on chip for dots / norms / gathered DLA; in fixed-direction mode the DLA comes from
  `kernels.dla_table.dla_fixed` (cheaper in head space).

Accumulation is float32 (outputs float32); bf16 / fp16 inputs feed the projection mma natively.
float64 inputs are rejected with a ValueError (use backend="torch" or "cpp"). fp32 dots are exact
IEEE fp32 unless `set_allow_tf32(True)` (or ``ERASURE_FAST_TRITON_TF32=1``) allows TF32 tensor cores.

Triton decides between compiling and interpreting a kernel when its ``@triton.jit`` decorator runs,
which here is the first import of ``erasure_fast.kernels`` (the first `available()` or call). So
``TRITON_INTERPRET=1`` must be set before that; ``DEVICES`` -- ("cuda",), or ("cuda", "cpu") for
interpreted kernels -- follows how the kernels were actually decorated, and nothing is ever reloaded.

The kernels live in the top-level ``kernels/`` and are ``erasure_fast.kernels`` in a wheel, an editable
install and a source checkout alike (see `erasure_fast.kernels`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .base import Backend, FusedInputs, FusedOutputs

NAME = "triton"
ENV_TF32 = "ERASURE_FAST_TRITON_TF32"

_allow_tf32: Optional[bool] = None  # set_allow_tf32(); None = environment variable, default False


def _kernels():
    """The kernel modules (fused_attribution, dla_table), imported once."""
    from ..kernels import dla_table, fused_attribution

    return fused_attribution, dla_table


def _interpret() -> bool:
    """True when the kernels were decorated for the interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from ..kernels import triton_common
    except Exception:
        return os.environ.get("TRITON_INTERPRET") == "1"
    return bool(triton_common.INTERPRET)


def _devices() -> tuple:
    """The device types the kernels run on: ("cuda",), or ("cuda", "cpu") for interpreted kernels."""
    return ("cuda", "cpu") if _interpret() else ("cuda",)


def __getattr__(name: str):
    if name == "DEVICES":
        return _devices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_allow_tf32(flag: Optional[bool]) -> None:
    """Allow TF32 tensor cores for fp32 inputs (faster, ~1e-3 relative error); None = env default."""
    global _allow_tf32
    _allow_tf32 = None if flag is None else bool(flag)


def allow_tf32() -> bool:
    if _allow_tf32 is not None:
        return _allow_tf32
    return os.environ.get(ENV_TF32, "").strip() in ("1", "true", "True", "yes")


def available() -> tuple[bool, str]:
    try:
        import triton
    except Exception as e:  # ImportError or a broken install
        return False, f"triton not importable: {e}"
    ver = ".".join(triton.__version__.split(".")[:2])
    try:
        _kernels()
    except ImportError as e:
        return False, f"triton {ver} installed but the kernels (erasure_fast.kernels) do not import: {e}"
    if _interpret():
        return True, f"triton {ver} interpreter (TRITON_INTERPRET=1, CPU, correctness only)"
    if not torch.cuda.is_available():
        return False, f"triton {ver} installed but no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU for testing)"
    return True, f"triton {ver} on {torch.cuda.get_device_name()}"


def run(inp: FusedInputs) -> FusedOutputs:
    """Compute the contract's outputs with the Triton kernels (see the module docstring)."""
    if inp.z.dtype == torch.float64:
        raise ValueError(
            "the Triton backend computes in float32 and does not take float64 inputs; "
            "use backend='torch' or backend='cpp' for float64"
        )
    dev = inp.z.device
    if dev.type != "cuda" and not _interpret():
        raise ValueError(f"the Triton backend runs on CUDA tensors (or CPU with TRITON_INTERPRET=1), got {dev}")
    ok, detail = available()
    if not ok:
        raise ValueError(f"backend 'triton' is not available here: {detail}")
    fa, dt = _kernels()
    tf32 = allow_tf32()
    T, N, _ = inp.z.shape
    M = inp.extra_nodes.shape[1]
    W = int(inp.writers.numel())
    if W == 0:
        dla, head_norms = dt.dla_only(
            inp.z, inp.W_O, inp.directions, inp.scale, inp.direction_ids, inp.incorrect_ids, inp.center,
            allow_tf32=tf32,
        )
        norms = head_norms
        if M:
            norms = torch.cat([head_norms, inp.extra_nodes.to(torch.float32).square().sum(-1)], dim=1)
        dots = torch.empty((T, N + M, 0), dtype=torch.float32, device=dev)
        return FusedOutputs(dla=dla, dots=dots, norms=norms if inp.with_norms else None)
    dla, dots, norms = fa.fused_attribution(
        inp.z, inp.W_O, inp.directions, inp.scale, inp.writers, inp.extra_nodes,
        inp.direction_ids, inp.incorrect_ids, inp.center, allow_tf32=tf32, writers_host=inp.writers_host,
    )
    if dla is None:  # fixed direction set: head-space table
        dla = dt.dla_fixed(inp.z, inp.W_O, inp.directions, inp.scale, inp.center, allow_tf32=tf32)
    return FusedOutputs(dla=dla, dots=dots, norms=norms if inp.with_norms else None)


class TritonBackend(Backend):
    """The fused GPU kernels (CUDA; CPU under the Triton interpreter)."""

    name = NAME

    @property
    def devices(self) -> tuple:
        return _devices()

    def available(self) -> tuple[bool, str]:
        return available()

    def run(self, inputs: FusedInputs) -> FusedOutputs:
        return run(inputs)
