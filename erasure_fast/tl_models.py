"""TransformerLens models (TL 4 `TransformerBridge`, TL 3 `HookedTransformer`) built from a
TransformerLens-style config dict and weights in HookedTransformer naming -- the one place that knows
how each TransformerLens major version takes a state dict. Used by checkpoint loading and the demo."""

from __future__ import annotations

from importlib import metadata

import torch


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says why and what to do."""


def tl_major() -> int:
    """The installed TransformerLens major version."""
    return int(metadata.version("transformer-lens").split(".")[0])


# How a TransformerLens-style checkpoint's weights are taken: as stored, or processed as
# `HookedTransformer.from_pretrained` processes them by default (see `from_pretrained_processing`).
PROCESSING = ("raw", "from_pretrained")
PROCESSING_WORDS = {
    "raw": "raw (the checkpoint's weights as stored)",
    "from_pretrained": "processed as TransformerLens's HookedTransformer.from_pretrained does by default "
                       "(fold_ln, center_writing_weights, center_unembed, fold_value_biases)",
}


def check_processing(processing) -> str:
    if processing not in PROCESSING:
        raise ValueError(f"processing must be one of {', '.join(map(repr, PROCESSING))}, got {processing!r}")
    return processing


def from_pretrained_processing(cfg: dict, sd: dict) -> dict:
    """The weights ``sd`` (HookedTransformer naming, TL-style config ``cfg``) processed as
    TransformerLens's ``HookedTransformer.from_pretrained`` does with its defaults (unchanged since
    TransformerLens 1.0, so also what the paper's authors loaded): fold_ln, center_writing_weights,
    center_unembed, fold_value_biases. Returns a new dict; ``sd`` is left as it is.

    - fold_ln (LayerNorm models): each norm's weight and bias go into the weights that read its output
      (W_Q/W_K/W_V, W_in, W_U and their biases), whose d_model mean is then removed (a centred input
      has none). The norms stay, with weight 1 and bias 0: the same computation as TransformerLens's
      LNPre, and the same hooks.
    - center_writing_weights (LayerNorm models without a final RMS norm): W_E, W_pos, W_O, b_O, W_out
      and b_out lose their d_model mean -- the stream's mean, which every LayerNorm removes.
    - center_unembed: W_U and b_U lose their mean over the vocabulary (logits move by a constant).
    - fold_value_biases: b_O += sum over heads of b_V W_O and b_V = 0 (attention weights sum to 1, so
      a value bias adds a constant to the layer's output). A head's output z W_O no longer holds it.
    As in TransformerLens, folding and centring are skipped for models without LayerNorm."""
    sd = {k: v.clone() for k, v in sd.items()}
    layer_norm = cfg.get("normalization_type") in ("LN", "LNPre")
    final_rms = bool(cfg.get("final_rms", False))

    def fold(norm: str, readers, d_model_axis: int, center: bool = True) -> None:
        """Fold norm ``norm`` (keys norm.w / norm.b, when there) into each (weight, bias) of ``readers``
        (d_model on the weight's ``d_model_axis``), then set it to weight 1, bias 0; remove each weight's
        d_model mean when ``center``."""
        for weight, bias in readers:
            W = sd[weight]
            shape = [1] * W.ndim
            shape[d_model_axis] = -1
            if norm + ".b" in sd:
                sd[bias] = sd[bias] + (W * sd[norm + ".b"].reshape(shape)).sum(d_model_axis)
            if norm + ".w" in sd:
                W = W * sd[norm + ".w"].reshape(shape)
            sd[weight] = W - W.mean(d_model_axis, keepdim=True) if center else W
        for key, value in ((".w", torch.ones_like), (".b", torch.zeros_like)):
            if norm + key in sd:
                sd[norm + key] = value(sd[norm + key])

    L = cfg["n_layers"]
    if layer_norm:
        for l in range(L):
            p = f"blocks.{l}."
            fold(p + "ln1", [(p + f"attn.W_{m}", p + f"attn.b_{m}") for m in "QKV"], 1)  # W_Q [head, d_model, d_head]
            if not cfg.get("attn_only", False):
                fold(p + "ln2", [(p + "mlp.W_in", p + "mlp.b_in")], 0)  # W_in [d_model, d_mlp]
                if p + "mlp.ln.w" in sd:  # SoLU's norm inside the MLP reads d_mlp and feeds W_out
                    fold(p + "mlp.ln", [(p + "mlp.W_out", p + "mlp.b_out")], 0)
        fold("ln_final", [("unembed.W_U", "unembed.b_U")], 0, center=not final_rms)  # an RMS output is not centred
        if not final_rms:
            for key in ["embed.W_E", "pos_embed.W_pos"] + [f"blocks.{l}.{k}" for l in range(L)
                                                          for k in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")]:
                if key in sd:
                    sd[key] = sd[key] - sd[key].mean(-1, keepdim=True)
    sd["unembed.W_U"] = sd["unembed.W_U"] - sd["unembed.W_U"].mean(-1, keepdim=True)
    if "unembed.b_U" in sd:
        sd["unembed.b_U"] = sd["unembed.b_U"] - sd["unembed.b_U"].mean()
    for l in range(L):
        p = f"blocks.{l}.attn."
        if p + "b_V" in sd:
            sd[p + "b_O"] = sd[p + "b_O"] + torch.einsum("hk,hkd->d", sd[p + "b_V"], sd[p + "W_O"])
            sd[p + "b_V"] = torch.zeros_like(sd[p + "b_V"])
    return sd


def model_from_tl_state_dict(cfg: dict, sd: dict, *, tokenizer=None, dtype: torch.dtype = torch.float32,
                             name: str = "native", path: str = "<state dict>", processing: str = "raw"):
    """TL 4 ``TransformerBridge`` (TL 3: ``HookedTransformer``) from a TL-style config dict (keys of
    `read_tl_config`) and weights in HookedTransformer naming, loaded strictly; ``processing``: "raw"
    (as given) or "from_pretrained" (`from_pretrained_processing`, in float64 then cast)."""
    check_processing(processing)
    cfg = dict(cfg)
    cfg.pop("tokenizer_name", None)
    if processing == "from_pretrained":
        sd = from_pretrained_processing(cfg, {k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
    final_rms = cfg.pop("final_rms", False)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if tl_major() >= 4:
        import transformer_lens.model_bridge.sources.native  # noqa: F401
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

        bcfg = TransformerBridgeConfig(**cfg, final_rms=final_rms, positional_embedding_type="standard")
        model = TransformerBridge.boot_native(bcfg, tokenizer=tokenizer, dtype=dtype, model_name=name)
        try:
            converted = convert_tl_checkpoint(sd, bcfg)
        except ValueError as e:
            raise ModelLoadError(f"{path}: weights do not match config.json ({e})") from None
        if "unembed.bias" not in converted:  # legacy repos ship no unembed bias
            converted["unembed.bias"] = torch.zeros(bcfg.d_vocab, dtype=dtype)
        try:
            model.load_state_dict(converted, strict=True)
        except RuntimeError as e:
            raise ModelLoadError(f"{path}: weights do not match config.json ({str(e)[:500]})") from None
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        hcfg = HookedTransformerConfig(**cfg, final_rms=final_rms, dtype=dtype, positional_embedding_type="standard")
        model = HookedTransformer(hcfg, tokenizer=tokenizer)
        sd.setdefault("unembed.b_U", torch.zeros(hcfg.d_vocab, dtype=dtype))
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise ModelLoadError(f"{path}: weights do not match config.json ({str(e)[:500]})") from None
        missing = [k for k in missing if not k.endswith(("IGNORE", "mask"))]  # buffers, not weights
        if missing or unexpected:
            raise ModelLoadError(f"{path}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return model
