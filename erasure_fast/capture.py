"""The lean forward pass: capture only what the attribution needs.

Hooks: ``blocks.{l}.attn.hook_z`` (all layers), ``blocks.{l}.hook_mlp_out`` (when MLP nodes are
wanted), ``blocks.0.hook_resid_pre`` (the embedding node: whatever the model puts in the stream before
its first block -- token and positional embeddings, embedding scaling, an embedding LayerNorm; rotary
and ALiBi models add nothing there), and the final residual stream ``blocks.{L-1}.hook_resid_post``
-- at which point the forward pass is stopped: no final norm, no unembedding matmul, no full cache.
The final-LN scale is recomputed from the final residual exactly as TransformerLens defines it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .models import ModelSpec
from .models.tl import tl_kind


EMBED_HOOK = "blocks.0.hook_resid_pre"


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass before the unembedding."""


@dataclass
class Capture:
    """Activations of one batch. Shapes: z [B, P, L*H, d_head] (layer-major heads),
    mlp_out [B, P, L, d_model] or None, embed [B, P, d_model] (the stream before block 0) or None,
    scale [B, P] (final-LN scale; ones for models without a final norm)."""

    z: torch.Tensor
    mlp_out: Optional[torch.Tensor]
    embed: Optional[torch.Tensor]
    scale: torch.Tensor
    extra: Dict[str, torch.Tensor] = None
    resid_points: Optional[torch.Tensor] = None  # [B, P, R, d_model], only for non-additive blocks
    # [B, P, L + 1, d_model]: mlp_out then embed in one block, whose views they are (the weights
    # engine fills it so the attribution need not concatenate them); None elsewhere.
    stream_nodes: Optional[torch.Tensor] = None


def validate_tokens(tokens, spec: ModelSpec, name: str = "tokens") -> torch.Tensor:
    """[batch, pos] integer token ids in [0, d_vocab) (a 1-D tensor is one prompt)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape [batch, pos], got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, pos], got {list(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"{name} is empty (shape {list(tokens.shape)}); pass at least one token")
    if spec.n_ctx is not None and tokens.shape[1] > spec.n_ctx:
        raise ValueError(f"{name} has {tokens.shape[1]} positions but the model's n_ctx is {spec.n_ctx}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= spec.d_vocab:
        raise ValueError(f"{name} must lie in [0, d_vocab={spec.d_vocab}), got values in [{lo}, {hi}]")
    return tokens.long()


def final_scale(resid: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Final-LN scale [..] from the final residual [.., d_model] (ln_final.hook_scale semantics)."""
    if spec.normalization is None:
        return torch.ones(resid.shape[:-1], dtype=resid.dtype, device=resid.device)
    x = resid
    if spec.center:
        x = x - x.mean(dim=-1, keepdim=True)
    return (x.pow(2).mean(dim=-1) + spec.final_eps).sqrt()


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def run_until(model, tokens: torch.Tensor, hooks, keep, stop: str) -> Dict[str, torch.Tensor]:
    """Run ``model`` on ``tokens`` with the forward ``hooks`` (name, fn) first, keep the activations named
    in ``keep`` and end the pass at hook ``stop`` (kept too): no later block, no unembedding. Returns
    {hook name: activation}; a ``stop`` hook that never fires is a RuntimeError."""
    store: Dict[str, torch.Tensor] = {}

    def keeper(name, last):
        def hook(t, hook=None):
            store[name] = t.detach()
            if last:
                raise _StopForward
        return hook

    names = list(dict.fromkeys(name for name in keep if name != stop))
    all_hooks = list(hooks) + [(name, keeper(name, False)) for name in names] + [(stop, keeper(stop, True))]
    tokens = tokens.to(model_device(model))
    with torch.inference_mode():
        try:
            if tl_kind(model) == "hooked":
                model.run_with_hooks(tokens, return_type=None, fwd_hooks=all_hooks)
            else:
                model.run_with_hooks(tokens, fwd_hooks=all_hooks)
        except _StopForward:
            pass
    if stop not in store:
        raise RuntimeError(f"hook {stop} never fired; the model's hook layout is not supported")
    return store


def capture(model, tokens: torch.Tensor, spec: ModelSpec, *, include_mlps: bool = True, include_embed: bool = True,
            extra_hooks=(), keep_hooks=(), stream_points: bool = False) -> Capture:
    """Run ``model`` on ``tokens`` [batch, pos] (validated) and return the `Capture`.

    ``extra_hooks``: (name, fn) forward hooks run before ours (interventions such as patches);
    ``keep_hooks``: further hook names whose activations are kept in ``Capture.extra``;
    ``stream_points``: read the residual points from the stream even where the blocks are additive
    (the points are then not sums of the nodes, e.g. under a hook of the user's)."""
    L = spec.n_layers
    final = f"blocks.{L - 1}.hook_resid_post"
    z_hooks = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    mlp_hooks = [f"blocks.{l}.hook_mlp_out" for l in range(L)] if include_mlps and spec.has_mlps else []
    read_points = include_embed and (stream_points or not spec.additive_blocks)
    point_hooks = resid_point_hooks(spec) if read_points else []
    keep = z_hooks + list(keep_hooks) + mlp_hooks + ([EMBED_HOOK] if include_embed else []) + point_hooks
    store = run_until(model, tokens, extra_hooks, keep, final)
    missing = [name for name in z_hooks if name not in store]
    if missing:
        raise RuntimeError(f"hooks did not fire: {missing}")
    with torch.inference_mode():
        z = torch.stack([store[name] for name in z_hooks], dim=2)  # [B, P, L, H, dh]
        B, P = z.shape[:2]
        z = z.reshape(B, P, L * spec.n_heads, spec.d_head)
        mlp = torch.stack([store[name] for name in mlp_hooks], dim=2) if mlp_hooks else None
        embed = store[EMBED_HOOK] if include_embed else None
        scale = final_scale(store[final], spec)
        points = torch.stack([store[name] for name in point_hooks], dim=2) if point_hooks else None
    return Capture(z=z, mlp_out=mlp, embed=embed, scale=scale, extra={k: store[k] for k in keep_hooks if k in store},
                   resid_points=points)


def resid_point_hooks(spec: ModelSpec) -> list:
    """The hook of each residual point of `ModelSpec.resid_labels`, in that order."""
    names = {"resid_pre0": EMBED_HOOK}
    for l in range(spec.n_layers):
        names[f"resid_mid{l}"] = f"blocks.{l}.hook_resid_mid"
        names[f"resid_post{l}"] = f"blocks.{l}.hook_resid_post"
    return [names[label] for label in spec.resid_labels()]
