"""erasure_fast: fused kernels for direct logit attribution (DLA) and erasure analysis.

Public names (all importable from a fresh interpreter, none shadowing a subpackage):
`attribute`, `AttributionResult`, `logit_attrs_heads`, `fused_attribution`, `FusedOutputs`,
`derive_measures`, `available_backends`, `build_dla_table`, `DlaTable`, `scan`, `ScanResult`,
`ModelSpec`, `model_spec`, `load_model`. Subpackages: `erasure_fast.paper` (the paper's analyses),
`erasure_fast.scanning` (corpus scans), `erasure_fast.backends`, `erasure_fast.bench`.
The contract and the math: docs/math.md in the repository, and `erasure_fast.contract`.
"""

from .version import __version__  # noqa: F401 (erasure_fast.__version__)

import importlib

# Public name -> the module that defines it, imported on first use: `import erasure_fast` (and so the
# command line, before it has parsed its arguments) loads no torch, so Ctrl-C during start-up is
# the command's to answer in one line.
_PUBLIC = {
    "AttributionResult": ".attribution", "attribute": ".attribution",
    "available_backends": ".backends",
    "DlaTable": ".backends.dla_table", "build_dla_table": ".backends.dla_table",
    "FusedOutputs": ".contract", "derive_measures": ".contract", "fused_attribution": ".contract",
    "load_model": ".loading",
    "ModelSpec": ".models", "UnsupportedModelError": ".models", "as_transformer_lens": ".models", "model_spec": ".models",
    "ScanResult": ".scanning", "scan": ".scanning",
    "logit_attrs_heads": ".tl_compat",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    else:
        try:  # a submodule (erasure_fast.scanning, erasure_fast.contract, ...)
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


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
