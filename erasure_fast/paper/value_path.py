"""How a writer head's output reaches a later layer's value input: norms with their scale frozen to the
clean run (`FrozenNorm`), the linear path through them (`ValuePath`), and each query head's K/V weights
under grouped-query attention. Fig 3 patches along this path, fig 5 reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..models import UnsupportedModelError, as_transformer_lens, model_spec


@dataclass
class FrozenNorm:
    """A LayerNorm / RMSNorm with its scale s frozen to the clean run: a linear map u -> c(u) / s * weight,
    c = centring (LayerNorm) or the identity (RMSNorm); ``weight`` is the effective one (Gemma's 1 + w,
    LayerNorm1P's 1 + w; None for a norm without one). ``scale_hook`` gives s [B, P, 1]."""

    weight: Optional[torch.Tensor]
    centres: bool
    scale_hook: str

    def linear(self, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The frozen norm's image of u [B, P, D] (a vector added to its input), scale [B, P] or [B, P, 1]."""
        if self.centres:
            u = u - u.mean(dim=-1, keepdim=True)
        u = u / scale.reshape(*u.shape[:-1], 1).to(u)
        return u if self.weight is None else u * self.weight.to(u)


def _probe_input(D: int, dtype, device) -> torch.Tensor:
    """Probe rows for a norm: +a, -a (zero mean, no zero entries), a constant row, a wavy row, +2a; scaled
    so that any eps is negligible and squares stay far from half precision's range."""
    i = torch.arange(D, dtype=torch.float64)
    a = torch.where(i % 2 == 0, 1.0, -1.0) * (1 + i / D)
    a = a - a.mean()
    wave = torch.sin(0.7 * i + 0.3) + 0.5 * torch.cos(2.3 * i)
    rows = torch.stack([a, -a, torch.ones(D, dtype=torch.float64), wave, 2 * a]) * 64.0
    return rows[None].to(device=device, dtype=dtype)


def frozen_norm(model, layer: int, which: str) -> Optional[FrozenNorm]:
    """blocks[layer].<which> (e.g. "ln1") as a `FrozenNorm`, or None when the block has none there (the
    sublayer reads / writes the stream as it is). The norm's effective weight and whether it centres are
    measured by calling the module on probe rows (no forward pass of the model), so every convention
    (1 + w weights, no bias, no weight) is the module's own. Raises `UnsupportedModelError` for a module
    that is not an elementwise-affine LayerNorm / RMSNorm, or whose scale hook measures another norm."""
    block = model.blocks[layer]
    module = getattr(block, which, None)
    if module is None or isinstance(module, torch.nn.Identity):
        return None
    p = next(iter(model.parameters()))
    D = model.cfg.d_model
    x = _probe_input(D, p.dtype, p.device)
    with torch.no_grad():
        y = module(x)[0].double()
    x = x[0].double()
    if tuple(y.shape) != (5, D) or not torch.isfinite(y).all():
        raise UnsupportedModelError(f"blocks.{layer}.{which} does not map the residual stream to itself")
    if torch.allclose(y, x, rtol=1e-3, atol=0):  # a slot that does not normalise (ModernBERT-decoder's layer 0)
        return None
    scale_hook = f"blocks.{layer}.{which}.hook_scale"
    if scale_hook not in model.hook_dict:
        raise UnsupportedModelError(f"blocks.{layer}.{which} has no {scale_hook} hook, so its scale cannot be frozen")
    a = x[0]
    bias = (y[0] + y[1]) / 2
    sigma = a.pow(2).mean().sqrt()
    weight = (y[0] - y[1]) / 2 * sigma / a
    span = max(float(weight.abs().max()), 1e-30)
    tol = max(4 * torch.finfo(p.dtype).eps ** 0.5, 1e-5)  # norms may compute in fp32 whatever the dtype
    centres = float((y[2] - bias).abs().max()) < 0.01 * span
    if not centres and float((y[2] - bias - weight).abs().max()) > tol * span:
        raise UnsupportedModelError(f"blocks.{layer}.{which} is neither a LayerNorm nor an RMSNorm "
                                    "(a constant input is neither removed nor kept)")
    for i in (3, 4):  # an elementwise affine map of the normalised input, scale-invariant
        c = x[i] - x[i].mean() if centres else x[i]
        pred = c / c.pow(2).mean().sqrt() * weight + bias
        if float((pred - y[i]).abs().max()) > tol * max(span, float(bias.abs().max())):
            raise UnsupportedModelError(f"blocks.{layer}.{which} is not an elementwise-affine "
                                        "LayerNorm / RMSNorm of its input, so its frozen-scale linear map is unknown")
    uses_rms = getattr(module, "uses_rms_norm", None)  # a TransformerLens 4 bridge computes hook_scale by it
    if isinstance(uses_rms, bool) and uses_rms == centres:
        raise UnsupportedModelError(
            f"blocks.{layer}.{which} {'centres' if centres else 'does not centre'} its input but "
            f"TransformerLens's {scale_hook} is computed as for {'an RMSNorm' if uses_rms else 'a LayerNorm'}")
    ones = torch.ones_like(weight)
    return FrozenNorm(weight=None if torch.allclose(weight, ones, rtol=0, atol=tol) else weight.to(p.dtype),
                      centres=centres, scale_hook=scale_hook)


def _hf_config(model):
    return getattr(getattr(model, "original_model", None), "config", None)


def _multiplier(cfg, name: str) -> float:
    value = getattr(cfg, name, None) if cfg is not None else None
    return 1.0 if value is None else float(value)


@dataclass
class ValuePath:
    """How a writer head's output reaches a later layer's value input with every norm scale frozen to the
    clean run (linear then): its share of the stream is u = out_multiplier * post(r_w) -- ``post`` the
    norm on the writer layer's attention output (post-norm blocks: Gemma 2/3, OLMo 2, ...), or none --
    and its share of the value input x = in_multiplier * pre(u), ``pre`` the eraser layer's ln1 (none:
    the attention reads the stream itself, OLMo 2). The multipliers are Granite's residual multiplier
    and Falcon-H1's attention in / out multipliers (1 elsewhere)."""

    post: Optional[FrozenNorm]
    pre: Optional[FrozenNorm]
    out_multiplier: float = 1.0
    in_multiplier: float = 1.0

    @staticmethod
    def head_output(model, z: torch.Tensor, head: int) -> torch.Tensor:
        """r_w [B, P, D] = z[:, :, head] W_O with TransformerLens's W_O -- the output projection itself, before
        the multipliers of `stream_share` (``z``: [B, P, L*H, d_head], ``head`` a flat index)."""
        layer, h = divmod(head, model.cfg.n_heads)
        W_O = model.W_O.detach()[layer, h]
        return z[:, :, head].to(W_O) @ W_O

    @property
    def scale_hooks(self) -> Tuple[str, ...]:
        """The hooks whose clean values `value_input` needs."""
        return tuple(n.scale_hook for n in (self.post, self.pre) if n is not None)

    def stream_share(self, r_w: torch.Tensor, kept: dict) -> torch.Tensor:
        """u [B, P, D]: the writer's output r_w [B, P, D] as it enters the stream."""
        u = r_w if self.post is None else self.post.linear(r_w, kept[self.post.scale_hook])
        return u * self.out_multiplier if self.out_multiplier != 1.0 else u

    def value_input(self, r_w: torch.Tensor, kept: dict) -> torch.Tensor:
        """x [B, P, D]: the writer's share of the eraser layer's value input (``kept``: clean `scale_hooks`)."""
        u = self.stream_share(r_w, kept)
        x = u if self.pre is None else self.pre.linear(u, kept[self.pre.scale_hook])
        return x * self.in_multiplier if self.in_multiplier != 1.0 else x


def value_path(model, writer_layer: int, layer: int) -> ValuePath:
    """The `ValuePath` from layer ``writer_layer``'s heads to layer ``layer``'s value input; raises
    `UnsupportedModelError` (before any forward pass) when a norm on the way cannot be frozen."""
    model = as_transformer_lens(model)
    cfg = _hf_config(model)
    return ValuePath(post=frozen_norm(model, writer_layer, "ln1_post"),
                     pre=frozen_norm(model, layer, "ln1"),
                     out_multiplier=_multiplier(cfg, "residual_multiplier") * _multiplier(cfg, "attention_out_multiplier"),
                     in_multiplier=_multiplier(cfg, "attention_in_multiplier"))


def value_weights(model, layer: int) -> torch.Tensor:
    """W_V of ``layer`` per key/value head [n_kv, D, d_head] (grouped-query attention: fewer than the
    query heads; a TransformerLens version that repeats them per query head is folded back)."""
    spec = model_spec(model)
    W_V = model.W_V.detach()[layer]
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or W_V.shape[0])
    if W_V.shape[0] == spec.n_heads and n_kv < spec.n_heads:
        W_V = W_V[:: spec.n_heads // n_kv]
    return W_V


def kv_group(spec, head_in_layer: int, n_kv: int) -> int:
    """The key/value head that query head ``head_in_layer`` reads (grouped-query attention repeats each
    key/value head over consecutive query heads)."""
    if spec.n_heads % n_kv:
        raise ValueError(f"{spec.n_heads} query heads do not share {n_kv} key/value heads evenly")
    return head_in_layer // (spec.n_heads // n_kv)
