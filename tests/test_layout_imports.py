"""The repository's layout as imports see it: the backends' modules stay behind the backends package's
interface, and the Triton kernels (the top-level ``kernels/``) are ``erasure_fast.kernels`` wherever the
package comes from."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKEND_MODULES = {"cpp", "torch_ref", "triton"}


def _imported_modules(path: Path):
    """(line, dotted name) of every module an ``import`` / ``from ... import`` in ``path`` names,
    relative imports resolved against the file's package."""
    package = list(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, module
            for alias in node.names:  # `from ..backends import cpp`
                yield node.lineno, f"{module}.{alias.name}"


def test_no_module_outside_backends_imports_a_backend_module():
    backends = REPO / "erasure_fast" / "backends"
    offenders = []
    for path in sorted((REPO / "erasure_fast").rglob("*.py")):
        if backends in path.parents:
            continue
        for line, name in _imported_modules(path):
            parts = name.split(".")
            if parts[:2] == ["erasure_fast", "backends"] and len(parts) > 2 and parts[2] in BACKEND_MODULES:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not offenders, "import the backends' interface (erasure_fast.backends, .scan_kernels) instead:\n" + "\n".join(offenders)


def test_the_scan_reaches_its_kernels_through_the_interface():
    from erasure_fast.backends import cpp, scan_kernels
    from erasure_fast.scanning import aggregate, pair_stats

    assert aggregate.scan_kernel is scan_kernels.scan_kernel and pair_stats.scan_rows is scan_kernels.scan_rows
    import torch

    values = torch.zeros(3, 2, 4)
    assert scan_kernels.scan_rows(values) is values
    got, want = scan_kernels.scan_kernel("series_stats_batch", values), cpp.scan_kernel("series_stats_batch", values)
    assert (got is None) == (want is None)
    assert scan_kernels.scan_kernel("series_stats_batch", values.half()) is None  # no float16 entry

