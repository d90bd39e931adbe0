"""erasure_fast: fused kernels for direct logit attribution (DLA) and erasure analysis.

Public names (all importable from a fresh interpreter, none shadowing a subpackage):
`attribute`, `AttributionResult`, `logit_attrs_heads`, `fused_attribution`, `FusedOutputs`,
`derive_measures`, `available_backends`, `build_dla_table`, `DlaTable`, `scan`, `ScanResult`,
`ModelSpec`, `model_spec`, `load_model`. Subpackages: `erasure_fast.paper` (the paper's analyses),
`erasure_fast.scanning` (corpus scans), `erasure_fast.backends`, `erasure_fast.bench`.
The contract and the math: docs/math.md in the repository, and `erasure_fast.contract`.
"""

from .version import __version__  # noqa: F401 (erasure_fast.__version__)

from .attribution import AttributionResult, attribute
from .backends import available_backends
from .backends.dla_table import DlaTable, build_dla_table
from .contract import FusedOutputs, derive_measures, fused_attribution
from .loading import load_model
from .models import ModelSpec, UnsupportedModelError, as_transformer_lens, model_spec
from .scanning import ScanResult, scan
from .tl_compat import logit_attrs_heads

__all__ = [
    "as_transformer_lens",
    "attribute",
    "AttributionResult",
    "available_backends",
    "build_dla_table",
    "derive_measures",
    "DlaTable",
    "fused_attribution",
    "FusedOutputs",
    "load_model",
    "logit_attrs_heads",
    "ModelSpec",
    "model_spec",
    "scan",
    "ScanResult",
    "UnsupportedModelError",
]
