"""The scan's aggregation kernels, as the rest of the package reaches them (`erasure_fast.scanning`
imports this module, never a backend's own).

* `scan_kernel(name, values)`: the compiled entry ``{name}_f32`` / ``{name}_f64``
  (csrc/scan_aggregates.h) for float32 / float64 ``values`` on the CPU, with the C++ backend's thread
  and kernel-path settings; None where the extension is not built, the dtype has no entry or the
  values are on another device (the caller then folds with its torch reference, on that device).
* `scan_rows(block)`: ``block`` [T, R, W] as those kernels read it in place (itself when its [R, W]
  rows are contiguous, else a contiguous copy).

Both go to the C++ backend's `Backend.scan_kernel` / `Backend.scan_rows` through the registry: it is
the one backend with compiled scan kernels, whichever backend computed the values.
"""

from __future__ import annotations

import torch

from . import backend_instance

_KERNELS = "cpp"  # the backend whose scan kernels fold the aggregates


def scan_kernel(name: str, values: torch.Tensor):
    """The compiled scan-aggregation entry ``name`` for ``values``, or None (see the module docstring)."""
    return backend_instance(_KERNELS).scan_kernel(name, values)


def scan_rows(block: torch.Tensor) -> torch.Tensor:
    """``block`` [T, R, W] as the scan kernels read it in place (see the module docstring)."""
    return backend_instance(_KERNELS).scan_rows(block)
