"""erasure_fast: fused kernels for direct logit attribution (DLA) and erasure analysis.

Public names: `attribute`, `logit_attrs_heads`, `fused_attribution`, `scan`, `backends`,
`derive_measures`, `AttributionResult`, `ScanResult`, `ModelSpec`, `model_spec`; the paper's analyses
in `erasure_fast.paper`, the benchmark harness in `erasure_fast.bench`. See README.md and shared/erasure-math.md.
"""

from .backends import backends
from .contract import FusedOutputs, derive_measures, fused_attribution

__version__ = "0.1.0"


def __getattr__(name):  # model-facing API imports TransformerLens lazily (slow import)
    if name in ("attribute", "AttributionResult"):
        from . import attribution

        return getattr(attribution, name)
    if name == "logit_attrs_heads":
        from .tl_compat import logit_attrs_heads

        return logit_attrs_heads
    if name in ("scan", "ScanResult"):
        from . import scan as scan_pkg

        return getattr(scan_pkg, name)
    if name == "paper":
        import importlib

        return importlib.import_module(".paper", __name__)
    if name in ("ModelSpec", "model_spec"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'erasure_fast' has no attribute {name!r}")


__all__ = [
    "attribute",
    "AttributionResult",
    "backends",
    "derive_measures",
    "fused_attribution",
    "FusedOutputs",
    "logit_attrs_heads",
    "ModelSpec",
    "model_spec",
    "scan",
    "ScanResult",
]
