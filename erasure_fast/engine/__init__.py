"""The capture engine: exactly what the attribution reads -- every head's z, the MLP outputs, the
embedding node, the final residual's norm scale (and the residual points of non-additive blocks) --
without TransformerLens's hook machinery, with fused attention (SDPA), no unembedding, no gradients.
Its `Capture` equals hook capture's (`erasure_fast.capture.capture`) field by field.

Two engines, chosen by where the model came from:

- `weights`: the forward recomputed from the weights (fused QKV, SDPA) for TransformerLens native
  bridges and 3.x HookedTransformers of the GPT-2 layout -- the benchmark path;
- `hf_modules`: for Hugging Face-loaded bridges, the model's own `transformers` modules run un-bridged
  (same tensors) with SDPA attention, reading each hook-capture tensor at the module input / output the
  bridge's hook resolves to -- exact by construction for every family TransformerLens bridges (rotary
  variants, ALiBi, GQA/MQA, parallel and post-norm blocks, q/k norms, embedding and residual
  multipliers, mixtures of experts).

`engine_problem` says in one line why neither covers a model (``capture="auto"`` then uses hook
capture and records why): a layout outside the weights engine's; for Hugging Face-loaded bridges,
compatibility mode or processed weights (TransformerLens's own forward on folded weights), a
``device_map`` dispatch, float64 in the few families whose float64 TransformerLens rounds differently
from their modules, or a hook that is no single module's input or output.
"""

from __future__ import annotations

from typing import Optional

from ..capture_modes import CaptureMode
from ..models import ModelSpec
from ..models.tl import tl_kind
from .hf_modules import HFModulesEngine, hf_engine_problem
from .weights import EngineWeights, engine_capture, weights_engine_problem

__all__ = ["CAPTURE_MODES", "EngineWeights", "HFModulesEngine", "engine_capture", "engine_for", "engine_problem"]

CAPTURE_MODES = tuple(m.value for m in CaptureMode)  # ("auto", "engine", "hooks")


def _hf_loaded(model) -> bool:
    return tl_kind(model) == "bridge" and type(getattr(model, "original_model", None)).__name__ != "NativeModel"


def engine_problem(model, spec: ModelSpec) -> Optional[str]:
    """Why the engine does not cover ``model`` (one line naming the family), or None when it does.
    Reads the model's structure and config only."""
    if _hf_loaded(model):
        return hf_engine_problem(model, spec)
    return weights_engine_problem(model, spec)


def engine_for(model, spec: ModelSpec):
    """The engine of ``model`` (`engine_problem` None): an `EngineWeights` or an `HFModulesEngine`,
    made once per spec (a spec is remade whenever the weights change); its ``capture(spec, tokens, ...)``
    gives the `Capture`."""
    if "engine" not in spec.derived:
        spec.derived["engine"] = (HFModulesEngine(model, spec) if _hf_loaded(model)
                                  else EngineWeights.from_model(model, spec))
    return spec.derived["engine"]
