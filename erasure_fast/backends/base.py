"""The one interface every backend implements (`Backend`), and the types it exchanges with the
contract (`FusedInputs` in, `FusedOutputs` out; `erasure_fast.contract` re-exports them).

Imports go one way: `erasure_fast.contract` validates and then calls a backend through
`erasure_fast.backends`; no backend imports the contract. A backend is a `Backend` subclass, registered
by name in `erasure_fast.backends` (torch: the reference; cpp: the CPU kernels; triton: the GPU
kernels); the registry hands out one instance per name. `run` (the fused contract) and `available`
are required; the other entry points are where a backend has them, and the base class refuses them
with a `NotImplementedError` that names the backend and the entry point.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import torch


class FusedOutputs(NamedTuple):
    """Result of `fused_attribution` (shapes in the module docstring)."""

    dla: torch.Tensor
    dots: torch.Tensor
    norms: Optional[torch.Tensor]


@dataclass(frozen=True)
class FusedInputs:
    """Validated, contiguous inputs handed to a backend. Every field obeys the module contract."""

    z: torch.Tensor  # [T, N, H], dtype in SUPPORTED_DTYPES
    W_O: torch.Tensor  # [N, H, D], z.dtype
    directions: torch.Tensor  # [K, D], z.dtype
    scale: torch.Tensor  # [T], accumulation dtype
    writers: torch.Tensor  # [W], int64, values in [0, N)
    extra_nodes: torch.Tensor  # [T, M, D], z.dtype (M may be 0)
    direction_ids: Optional[torch.Tensor]  # [T] int64 in [-1, K), or None (fixed-set mode)
    incorrect_ids: Optional[torch.Tensor]  # [T] int64 in [-1, K), or None
    center: bool
    with_norms: bool = True  # False: backends may return norms=None
    dla_table: Optional[object] = None  # a matching DlaTable (cpp backend; other backends ignore it)
    writers_host: Optional[torch.Tensor] = None  # writers on the host, where plans read them (no device read-back)
    # the inputs (z, W_O, extra_nodes, the rows of directions the call reads) not yet checked for NaN /
    # infinity: a backend that `checks_inputs` checks them itself (`erasure_fast.contract.run_backend`
    # checks them first for the others)
    check_inputs: bool = False
    # the outputs not yet checked for NaN / infinity (`erasure_fast.contract.require_finite_outputs`):
    # a backend that `checks_outputs` checks them as its kernels write them (`run_backend` checks them
    # after the run for the others)
    check_outputs: bool = False

    @property
    def n_tokens(self) -> int:
        return self.z.shape[0]

    @property
    def n_heads(self) -> int:
        return self.z.shape[1]

    @property
    def out_dtype(self) -> torch.dtype:
        return accumulation_dtype(self.z.dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32




class Backend(ABC):
    """A compute backend: the fused contract (`run`) and, where it has them, the DLA-only entry points,
    the head-space DLA table and the scan's aggregation kernels."""

    #: the registry's name ("torch", "cpp", "triton")
    name: str = ""
    #: device types the backend runs on; None = any device
    devices: Optional[Tuple[str, ...]] = None
    #: whether `run` honours `FusedInputs.check_inputs`: it checks the inputs for NaN / infinity itself
    #: (the weights before any work, the activations at the latest as its kernels read them), and a bad
    #: value raises the contract's ValueError (naming the input and the first bad index) instead of
    #: returning outputs
    checks_inputs: bool = False
    #: whether `run` honours `FusedInputs.check_outputs`: its kernels check the outputs as they write
    #: them, and an overflow raises the contract's ValueError instead of returning outputs
    checks_outputs: bool = False

    @abstractmethod
    def available(self) -> Tuple[bool, str]:
        """(whether it can run here, what it runs on -- or why not)."""

    @abstractmethod
    def run(self, inputs: FusedInputs) -> FusedOutputs:
        """The contract's outputs for validated ``inputs`` (see `erasure_fast.contract`)."""

    def _refuse(self, entry: str):
        raise NotImplementedError(f"the {self.name} backend has no {entry}; "
                                  "use fused_attribution (every backend runs it)")

    def dla_gathered(self, table, z: torch.Tensor, scale: torch.Tensor, direction_ids: torch.Tensor,
                     incorrect_ids: Optional[torch.Tensor] = None, **options):
        """Gathered DLA only, with or without a DLA table (the cpp backend)."""
        self._refuse("gathered DLA-only entry point (dla_gathered)")

    def dla_fixed(self, z: torch.Tensor, W_O: torch.Tensor, directions: torch.Tensor, scale: torch.Tensor, *,
                  center: bool = True, norms: bool = False):
        """Fixed-direction DLA only (the cpp backend)."""
        self._refuse("fixed-direction DLA-only entry point (dla_fixed)")

    def build_dla_table(self, W_O: torch.Tensor, directions: torch.Tensor, center: bool = True, *, lazy: bool = False):
        """A head-space DLA table for gathered DLA-only calls (the cpp backend)."""
        self._refuse("DLA table (build_dla_table)")

    def compiled(self, compiler: Callable[[Callable], Callable]) -> "Backend":
        """This backend with its torch math compiled by ``compiler`` (e.g. ``torch.compile``): the
        torch backend has it; compiled backends refuse."""
        self._refuse("torch math to compile (compiled)")

    def scan_kernel(self, name: str, values: torch.Tensor) -> Optional[Callable]:
        """The compiled scan-aggregation entry ``name`` for ``values``, or None where this backend has
        none for them (callers then fold with their torch reference, on the values' device)."""
        return None

    def scan_rows(self, block: torch.Tensor) -> torch.Tensor:
        """``block`` [T, R, W] as this backend's scan kernels read it (contiguous by default)."""
        return block.contiguous()

    def build_info(self) -> dict:
        """Facts about how the backend was built (the cpp backend: OpenMP, threads, kernel paths);
        empty where there is nothing to say."""
        return {}

    @property
    def NAME(self) -> str:
        """The registry name (the backend modules' ``NAME``)."""
        return self.name

    @property
    def DEVICES(self) -> Optional[Tuple[str, ...]]:
        """The device types it runs on (None = any)."""
        return self.devices

    def __repr__(self) -> str:
        return f"<erasure_fast {self.name} backend>"
