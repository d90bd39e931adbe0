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


def model_from_tl_state_dict(cfg: dict, sd: dict, *, tokenizer=None, dtype: torch.dtype = torch.float32,
                             name: str = "native", path: str = "<state dict>"):
    """TL 4 ``TransformerBridge`` (TL 3: ``HookedTransformer``) from a TL-style config dict (keys of
    `read_tl_config`) and weights in HookedTransformer naming, loaded strictly."""
    cfg = dict(cfg)
    cfg.pop("tokenizer_name", None)
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
