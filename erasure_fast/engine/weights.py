"""The capture engine from the weights: the forward pass recomputed from the model's weights, keeping exactly what the
attribution reads -- every head's z, the MLP outputs, the embedding node, the final residual's norm
scale -- with no hook machinery, fused QKV projections, `torch.nn.functional.scaled_dot_product_attention`
(flash / memory-efficient kernels on GPU), no unembedding, no gradients.

Covered layout (first stage): TransformerLens native bridges (GELU-4L and other checkpoints loaded from
TransformerLens-style weights, with or without compatibility mode) and 3.x HookedTransformers of the
GPT-2 layout -- pre-norm LayerNorm (or its folded LNPre form), learned absolute positions, one K/V head
per query head, sequential blocks, a GELU / ReLU MLP or none. `weights_engine_problem` says why any
other such model is not covered; Hugging Face-loaded bridges have their own engine (`hf_modules`).

Per layer l (x the residual stream [B, P, D], LN with the model's eps):
    h = LN1(x);  q, k, v = h W_QKV + b_QKV;  z = softmax(q kᵀ / sqrt(d_head) + causal mask) v
    x += z W_O + b_O;  mlp = act(LN2(x) W_in + b_in) W_out + b_out;  x += mlp
which is TransformerLens's own computation (its attention scale sqrt(d_head) is SDPA's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..capture import Capture, final_scale
from ..models import ModelSpec
from ..models.spec import CENTERING_NORMS
from ..models.tl import tl_kind

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _norm_params(module):
    """(weight, bias) of a LayerNorm module of either TransformerLens major version (None, None for LNPre)."""
    inner = getattr(module, "original_component", None) or getattr(module, "_original_component", None) or module
    weight = getattr(inner, "weight", None)
    if weight is None:
        weight = getattr(inner, "w", None)
    bias = getattr(inner, "bias", None)
    if bias is None:
        bias = getattr(inner, "b", None)
    return weight, bias


def _default_attn_scale(cfg, d_head: int) -> bool:
    scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)  # TransformerLens 4: -1 = sqrt(d_head)
    return scale <= 0 or abs(scale - d_head ** 0.5) <= 1e-12 * d_head


def weights_engine_problem(model, spec: ModelSpec) -> Optional[str]:
    """Why the engine from the weights does not cover ``model`` -- a native bridge or a HookedTransformer
    -- (one line), or None when it does. Reads the config only."""
    kind = tl_kind(model)
    cfg = model.cfg
    if kind not in ("bridge", "hooked"):
        return f"{type(model).__name__}: not a TransformerLens model"
    checks = [
        (spec.normalization in CENTERING_NORMS, f"normalization {spec.normalization!r} (the engine has LayerNorm)"),
        (getattr(cfg, "positional_embedding_type", "standard") == "standard",
         f"positional embeddings {getattr(cfg, 'positional_embedding_type', None)!r} (the engine has learned absolute ones)"),
        (not spec.parallel_blocks and spec.additive_blocks, "parallel or post-norm blocks"),
        ((getattr(cfg, "n_key_value_heads", None) or spec.n_heads) == spec.n_heads, "grouped-query attention"),
        (not getattr(cfg, "gated_mlp", False), "a gated MLP"),
        (spec.has_mlps is False or getattr(cfg, "act_fn", None) in _ACTIVATIONS,
         f"activation {getattr(cfg, 'act_fn', None)!r}"),
        (getattr(cfg, "use_attn_scale", True) and _default_attn_scale(cfg, spec.d_head), "an attention scale other than sqrt(d_head)"),
        (not getattr(cfg, "attn_scores_soft_cap", -1) or getattr(cfg, "attn_scores_soft_cap", -1) < 0, "attention soft-capping"),
        (not getattr(cfg, "use_local_attn", False), "local attention"),
        (not getattr(cfg, "post_embedding_ln", False), "an embedding LayerNorm"),
        (not getattr(cfg, "scale_attn_by_inverse_layer_idx", False), "attention scaled by layer index"),
    ]
    why = [what for ok, what in checks if not ok]
    return f"{spec.family}: the engine does not cover {', '.join(why)}" if why else None


@dataclass
class EngineWeights:
    """The weights the engine multiplies by, laid out for it: per layer W_qkv [D, 3*H*dh], b_qkv
    [3*H*dh], W_o [H*dh, D], b_o [D], ln1 / ln2 (weight, bias) or None, W_in, b_in, W_out, b_out."""

    W_E: torch.Tensor
    W_pos: torch.Tensor
    layers: List[dict]
    eps: float
    act: Optional[str]

    @classmethod
    def from_model(cls, model, spec: ModelSpec) -> "EngineWeights":
        with torch.no_grad():
            L, H, dh = spec.n_layers, spec.n_heads, spec.d_head
            W_Q, W_K, W_V = model.W_Q.detach(), model.W_K.detach(), model.W_V.detach()  # [L, H, D, dh]
            b_Q, b_K, b_V = model.b_Q.detach(), model.b_K.detach(), model.b_V.detach()  # [L, H, dh]
            layers = []
            for l in range(L):
                qkv = torch.stack([W_Q[l], W_K[l], W_V[l]])  # [3, H, D, dh]
                layer = dict(
                    W_qkv=qkv.permute(2, 0, 1, 3).reshape(spec.d_model, 3 * H * dh).contiguous(),
                    b_qkv=torch.stack([b_Q[l], b_K[l], b_V[l]]).reshape(3 * H * dh).contiguous(),
                    W_o=spec.W_O[l * H:(l + 1) * H].reshape(H * dh, spec.d_model).contiguous(),
                    b_o=spec.b_O[l].contiguous(),
                    ln1=_norm_params(model.blocks[l].ln1) if spec.normalization == "LN" else None,
                )
                if spec.has_mlps:
                    layer.update(W_in=model.W_in[l].detach().contiguous(), b_in=model.b_in[l].detach().contiguous(),
                                 W_out=model.W_out[l].detach().contiguous(), b_out=model.b_out[l].detach().contiguous(),
                                 ln2=_norm_params(model.blocks[l].ln2) if spec.normalization == "LN" else None)
                layers.append(layer)
            return cls(W_E=model.W_E.detach(), W_pos=model.W_pos.detach(), layers=layers, eps=float(model.cfg.eps),
                       act=getattr(model.cfg, "act_fn", None) if spec.has_mlps else None)

    def capture(self, spec: ModelSpec, tokens: torch.Tensor, *, include_mlps: bool = True,
                include_embed: bool = True) -> Capture:
        """`engine_capture` with these weights."""
        return engine_capture(spec, self, tokens, include_mlps=include_mlps, include_embed=include_embed)


def _layer_norm(x: torch.Tensor, params, eps: float) -> torch.Tensor:
    if params is None:  # LNPre (folded weights): centre and scale only
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    weight, bias = params
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def engine_capture(spec: ModelSpec, weights: EngineWeights, tokens: torch.Tensor, *, include_mlps: bool = True,
                   include_embed: bool = True) -> Capture:
    """The `Capture` of ``tokens`` [B, P] (validated ids on the weights' device) from the weights alone."""
    B, P = tokens.shape
    L, H, dh, D = spec.n_layers, spec.n_heads, spec.d_head, spec.d_model
    act = _ACTIVATIONS.get(weights.act)
    with torch.inference_mode():
        x = weights.W_E[tokens] + weights.W_pos[:P]
        z_all = torch.empty(B, P, L * H, dh, dtype=x.dtype, device=x.device)
        # The MLP outputs and the embedding in one block [B, P, L + 1, D], the layout the attribution
        # kernel reads its extra nodes in, so it takes them without a copy (Capture.stream_nodes).
        with_mlps = include_mlps and spec.has_mlps
        nodes = torch.empty(B, P, L + 1, D, dtype=x.dtype, device=x.device) if with_mlps and include_embed else None
        mlp_all = nodes[:, :, :L] if nodes is not None else (
            torch.empty(B, P, L, D, dtype=x.dtype, device=x.device) if with_mlps else None)
        embed = None
        if include_embed:
            embed = nodes[:, :, L] if nodes is not None else torch.empty_like(x)
            embed.copy_(x)
        for l, w in enumerate(weights.layers):
            h = _layer_norm(x, w["ln1"], weights.eps)
            qkv = torch.addmm(w["b_qkv"], h.reshape(B * P, D), w["W_qkv"]).view(B, P, 3, H, dh)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, P, dh]
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # [B, P, H, dh]
            z_all[:, :, l * H:(l + 1) * H] = z
            x = x + torch.addmm(w["b_o"], z.reshape(B * P, H * dh), w["W_o"]).view(B, P, D)
            if spec.has_mlps:
                h = _layer_norm(x, w["ln2"], weights.eps)
                mlp = torch.addmm(w["b_out"], act(torch.addmm(w["b_in"], h.reshape(B * P, D), w["W_in"])),
                                  w["W_out"]).view(B, P, D)
                if mlp_all is not None:
                    mlp_all[:, :, l] = mlp
                x = x + mlp
        scale = final_scale(x, spec)
    return Capture(z=z_all, mlp_out=mlp_all, embed=embed, scale=scale, stream_nodes=nodes)
