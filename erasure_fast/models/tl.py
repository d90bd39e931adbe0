"""TransformerLens models -- 4.x `TransformerBridge` (native or Hugging Face-loaded, with or without
compatibility mode) and 3.x `HookedTransformer` -- to `ModelSpec`."""

from __future__ import annotations

import sys
import weakref
from typing import Optional

import torch

from .layout import UnsupportedModelError, block_layout, family_name
from .spec import CENTERING_NORMS, ModelSpec


def tl_kind(model) -> Optional[str]:
    """"bridge" (TransformerLens 4 `TransformerBridge`), "hooked" (`HookedTransformer`) or None. Reads
    the classes from the modules already imported: a model of either class means its module was
    imported, and nothing is imported here (an optional import that failed would hide its cause)."""
    bridge = sys.modules.get("transformer_lens.model_bridge")
    if bridge is not None and isinstance(model, bridge.TransformerBridge):
        return "bridge"
    hooked = sys.modules.get("transformer_lens.HookedTransformer")  # TransformerLens 3's module of that name
    if hooked is not None and isinstance(model, hooked.HookedTransformer):
        return "hooked"
    return None


class _WeightsState:
    """What a model's weights are now: each parameter object (held weakly, compared by identity, so a
    parameter replaced by a new one -- even at the same address -- is a change) with its in-place
    version counter, storage address, dtype and device."""

    def __init__(self, model):
        self.items = [(weakref.ref(p), p._version, p.data_ptr(), p.dtype, p.device) for p in model.parameters()]

    def same_as(self, other: _WeightsState) -> bool:
        if len(self.items) != len(other.items):
            return False
        for (ra, *a), (rb, *b) in zip(self.items, other.items):
            pa = ra()
            if pa is None or pa is not rb() or a != b:
                return False
        return True


# Per-model cache of ModelSpec (documented in `spec_from_tl`): keyed weakly by the model, valid while
# its weights are unchanged, so repeated calls reuse the same W_O / directions tensors (which is what
# lets a DlaTable built from them match later calls).
_specs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def spec_from_tl(model, kind: str) -> ModelSpec:
    """The `ModelSpec` of a TransformerLens model, cached per model while its weights are unchanged:
    the same parameter objects, none modified in place (their version counters), so later calls get
    the very same W_O / directions tensors (a `DlaTable` built from them keeps matching). Weights
    written behind autograd's back (through ``.data`` or a numpy view) are not seen; rebuild the model
    or pass a fresh `ModelSpec` then. Raises `UnsupportedModelError` for layouts it cannot cover."""
    fp = _WeightsState(model)
    hit = _specs.get(model)
    if hit is not None and hit[0].same_as(fp):
        return hit[1]
    cfg = model.cfg
    has_mlps = not bool(getattr(cfg, "attn_only", False))
    layout = block_layout(model, kind, has_mlps)
    with torch.no_grad():
        try:
            W_O = model.W_O.detach()  # [L, H, dh, D]: one per query head (grouped-query attention included)
        except (RuntimeError, ValueError) as e:  # e.g. TransformerLens's PerLayerGeometryError
            raise UnsupportedModelError(
                f"{family_name(model, kind)}: TransformerLens cannot split its attention output projection into "
                "per-head W_O (multi-head latent attention, or a head geometry that differs per layer as in Gemma 4) "
                f"-- TransformerLens says: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        W_U = model.W_U.detach()
        L, H, dh, D = W_O.shape
        try:
            b_O = model.b_O.detach()
        except AttributeError:  # bias-free output projections (Llama, Qwen, Gemma, ...): b_O = 0
            b_O = torch.zeros(L, D, dtype=W_O.dtype, device=W_O.device)
        if layout.residual_scale != 1.0:  # what each head adds to the stream (Granite's residual_multiplier)
            W_O, b_O = W_O * layout.residual_scale, b_O * layout.residual_scale
    final_rms = bool(getattr(cfg, "final_rms", False))
    norm = cfg.normalization_type
    if kind == "bridge" and not hasattr(model, "ln_final"):
        norm = None  # no final norm (GPT-1): the unembedding reads the stream itself
    if kind == "bridge" and final_rms and norm in CENTERING_NORMS:
        norm = "RMS"  # TL 4 treats a final RMSNorm as non-centring even in LN-family models
    spec = ModelSpec(
        n_layers=L, n_heads=H, d_head=dh, d_model=D, d_vocab=W_U.shape[1],
        W_O=W_O.reshape(L * H, dh, D).contiguous(), b_O=b_O, W_U=W_U,
        normalization=norm, final_eps=float(cfg.eps), has_mlps=has_mlps,
        n_ctx=getattr(cfg, "n_ctx", None), kind=kind, parallel_blocks=layout.parallel,
        additive_blocks=layout.additive, family=family_name(model, kind), extra_writers=layout.extra_writers,
    )
    _specs[model] = (fp, spec)
    return spec
