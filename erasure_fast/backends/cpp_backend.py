"""The C++ backend as a `Backend`: the OpenMP CPU kernels of `erasure_fast.backends.cpp` (the fused
contract, the DLA-only entry points, the scan's aggregation kernels) and the head-space DLA tables of
`erasure_fast.backends.dla_table`. A module of its own because the tables build on the kernels' module:
imports go cpp <- dla_table <- cpp_backend."""

from __future__ import annotations

from . import cpp
from .base import Backend, FusedInputs, FusedOutputs
from .dla_table import build_dla_table


class CppBackend(Backend):
    """The OpenMP CPU kernels: the fused contract, the DLA-only entry points, DLA tables and the scan's
    aggregation kernels (module docstring)."""

    name = cpp.NAME
    devices = cpp.DEVICES
    checks_inputs = True
    checks_outputs = True

    def available(self) -> tuple[bool, str]:
        return cpp.available()

    def run(self, inputs: FusedInputs) -> FusedOutputs:
        return cpp.run(inputs)

    def dla_gathered(self, table, z, scale, direction_ids, incorrect_ids=None, **options):
        return cpp.dla_gathered(table, z, scale, direction_ids, incorrect_ids, **options)

    def dla_fixed(self, z, W_O, directions, scale, *, center=True, norms=False):
        return cpp.dla_fixed(z, W_O, directions, scale, center=center, norms=norms)

    def build_dla_table(self, W_O, directions, center=True, *, lazy=False):
        return build_dla_table(W_O, directions, center, lazy=lazy)

    def build_info(self) -> dict:
        return cpp.build_info()

    def scan_kernel(self, name, values):
        return cpp.scan_kernel(name, values)

    def scan_rows(self, block):
        return cpp.scan_rows(block)
