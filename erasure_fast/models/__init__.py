"""Models, whatever interface they come through, as the attribution sees them.

- `spec`: `ModelSpec` -- weights, sizes and block layout, the one object the kernels' callers read;
- `layout`: per-family layout facts (parallel blocks, post-norms, writers outside the nodes) and the
  refusals (`UnsupportedModelError`) for what per-head attribution cannot cover;
- one adapter per interface: `tl` (TransformerLens 4 bridges, 3.x `HookedTransformer`), `hf` (plain
  `transformers` models, bridged through TransformerLens 4's own architecture adapters) and
  `nnsight_lm` (nnsight `LanguageModel` / `TransformersModel`, the Hugging Face model inside it).

`as_transformer_lens` turns any supported model into the TransformerLens model that is run; `model_spec`
gives its `ModelSpec`.
"""

from __future__ import annotations

from .hf import bridge_of_hf, is_hf_model
from .hooks import refuse_hooks_of_copied_model
from .layout import BlockLayout, UnsupportedModelError
from .nnsight_lm import bridge_of_nnsight, is_nnsight_model
from .spec import ModelSpec, downstream_mask, is_downstream
from .tl import spec_from_tl, tl_kind

__all__ = [
    "BlockLayout",
    "ModelSpec",
    "UnsupportedModelError",
    "as_transformer_lens",
    "downstream_mask",
    "interface_name",
    "is_downstream",
    "model_spec",
]

SUPPORTED = ("TransformerLens 4 TransformerBridge, TransformerLens 3 HookedTransformer, a Hugging Face "
             "transformers model, or an nnsight LanguageModel or TransformersModel")


def as_transformer_lens(model, tokenizer=None):
    """The TransformerLens model that erasure_fast runs for ``model``: a TransformerLens model itself; for a
    plain `transformers` model or an nnsight `LanguageModel` / `TransformersModel`, a TransformerLens 4 bridge around the same
    weights (made once per model; ``tokenizer`` overrides the one it would load) -- refused, naming the
    hook, when the model has forward hooks attached, which the bridge would not run (`hooks`)."""
    if tl_kind(model) is not None:
        return model
    if is_nnsight_model(model):
        refuse_hooks_of_copied_model(getattr(model, "_module", model), f"nnsight {type(model).__name__}")
        return bridge_of_nnsight(model, tokenizer)
    if is_hf_model(model):
        refuse_hooks_of_copied_model(model, "transformers model")
        return bridge_of_hf(model, tokenizer)
    raise TypeError(f"model must be a {SUPPORTED}; got {type(model).__name__}. "
                    "For other models use erasure_fast.fused_attribution on raw tensors.")


def interface_name(model) -> str:
    """Which interface ``model`` comes through: "bridge", "hooked", "transformers" or "nnsight"."""
    kind = tl_kind(model)
    if kind is not None:
        return kind
    if is_nnsight_model(model):
        return "nnsight"
    if is_hf_model(model):
        return "transformers"
    raise TypeError(f"model must be a {SUPPORTED}; got {type(model).__name__}")


def model_spec(model) -> ModelSpec:
    """The `ModelSpec` of any supported model (a `ModelSpec` passes through unchanged); cached per
    model while its weights are unchanged (see `tl.spec_from_tl`). Raises `UnsupportedModelError`
    (a ValueError naming the family and why) for layouts per-head attribution cannot cover."""
    if isinstance(model, ModelSpec):
        return model
    tl = as_transformer_lens(model)
    return spec_from_tl(tl, tl_kind(tl))
