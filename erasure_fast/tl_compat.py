"""Drop-in replacements for TransformerLens cache methods, computed without the [n, B, P, d_model] stack."""

from __future__ import annotations

import torch

from .contract import fused_attribution
from .models import model_spec
from .tl_models import tl_major


def _token_ids(tokens, model, B: int, P: int, has_batch: bool, name: str) -> torch.Tensor:
    """Token ids broadcast to [B, P] with the installed TransformerLens's semantics."""
    if isinstance(tokens, str):
        tokens = model.to_single_token(tokens)
    t = torch.as_tensor(tokens)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must be token ids (int, str or integer tensor), got dtype {t.dtype}")
    t = t.long()
    if t.numel() == 1:  # TL reads any single-element tensor as one token
        return t.reshape(()).expand(B, P)
    if has_batch and t.ndim == 1 and t.shape[0] == B and tl_major() >= 4:
        return t[:, None].expand(B, P)  # TL 4: a [batch] tensor is one token per example
    try:
        return torch.broadcast_to(t, (B, P))  # TL 3 (and TL 4 otherwise): plain broadcasting
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {list(t.shape)} does not broadcast against [batch, pos]=[{B}, {P}]"
        ) from None


def logit_attrs_heads(cache, tokens, incorrect_tokens=None, *, backend: str = "auto", dla_table=None) -> torch.Tensor:
    """Same as ``cache.logit_attrs(cache.stack_head_results(layer=-1, apply_ln=False), tokens,
    incorrect_tokens)`` on a TransformerLens ActivationCache, without forming the stack.

    Args:
        cache: ActivationCache from ``run_with_cache`` holding every ``blocks.{l}.attn.hook_z`` and
            ``ln_final.hook_scale`` (batch dim kept or removed).
        tokens / incorrect_tokens: str, int, [batch], [pos] or [batch, pos] ids, as TransformerLens takes.
        backend: "auto", "torch", "cpp" or "triton".
        dla_table: optional `erasure_fast.DlaTable` built from ``model_spec(cache.model).W_O`` and
            ``.directions`` (cpp backend: next-token DLA gathered from it).
    Returns:
        [n_layers * n_heads, batch, pos] (or [n_heads_total, pos] without batch dim), in z's dtype.
    """
    model = cache.model
    spec = model_spec(model)
    L, H = spec.n_layers, spec.n_heads
    keys = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    missing = [k for k in keys if k not in cache]
    if missing:
        raise ValueError(f"cache lacks {missing}; run run_with_cache without a names_filter that drops hook_z")
    has_batch = bool(getattr(cache, "has_batch_dim", True))
    z = torch.stack([cache[k] for k in keys], dim=-3)  # [B?, P, L, H, dh]
    if not has_batch:
        z = z[None]
    B, P = z.shape[:2]
    z = z.reshape(B * P, L * H, spec.d_head)
    if spec.normalization is None:
        scale = torch.ones(B * P, dtype=z.dtype, device=z.device)
    else:
        if "ln_final.hook_scale" not in cache:
            raise ValueError("cache lacks ln_final.hook_scale; run run_with_cache without dropping it")
        scale = cache["ln_final.hook_scale"].reshape(B * P)
    ids = _token_ids(tokens, model, B, P, has_batch, "tokens")
    inc = None
    if incorrect_tokens is not None:
        t_shape = torch.as_tensor(model.to_single_token(tokens) if isinstance(tokens, str) else tokens).shape
        i_shape = torch.as_tensor(
            model.to_single_token(incorrect_tokens) if isinstance(incorrect_tokens, str) else incorrect_tokens
        ).shape
        if t_shape != i_shape:
            raise ValueError(f"tokens and incorrect_tokens must have the same shape, got {list(t_shape)} and {list(i_shape)}")
        inc = _token_ids(incorrect_tokens, model, B, P, has_batch, "incorrect_tokens")
    for name, x in (("tokens", ids), ("incorrect_tokens", inc)):
        if x is not None and (int(x.min()) < 0 or int(x.max()) >= spec.d_vocab):
            raise ValueError(f"{name} must lie in [0, d_vocab={spec.d_vocab}), got [{int(x.min())}, {int(x.max())}]")
    out = fused_attribution(
        z,
        spec.W_O.to(z.device, z.dtype),
        spec.directions.to(z.device, z.dtype),
        scale,
        [],
        direction_ids=ids.reshape(-1).to(z.device),
        incorrect_ids=None if inc is None else inc.reshape(-1).to(z.device),
        center=spec.center,
        backend=backend,
        with_norms=False,
        dla_table=dla_table,
    )
    dla = out.dla.to(z.dtype).reshape(B, P, L * H).permute(2, 0, 1)
    return dla if has_batch else dla[:, 0]
