"""Loading models by name: the real GELU-4L from the local Hugging Face cache, TransformerLens-style
checkpoint directories, and the planted demo model.

A TransformerLens-style directory (the layout of the NeelNanda/* repos) holds ``config.json`` with
d_model, n_layers, n_heads, d_head, d_mlp, d_vocab, n_ctx, act_fn and normalization_type (or
``normalization``), and weights in HookedTransformer parameter naming (``blocks.0.attn.W_O`` ...) as
``model.safetensors`` or a ``*.pth`` state dict (read with ``weights_only=True``; ``*final.pth``
preferred when there are several).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

import torch

from .tl_models import ModelLoadError, model_from_tl_state_dict

GELU_4L_REPO = "NeelNanda/GELU_4L512W_C4_Code"
ALIASES = {"gelu-4l": GELU_4L_REPO, GELU_4L_REPO.lower(): GELU_4L_REPO}
_REQUIRED = ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn")


def hf_snapshot_dir(repo_id: str, cache_dir: Optional[str] = None) -> str:
    """The local snapshot of ``repo_id`` in the Hugging Face cache, without any network access."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id} is not in the local Hugging Face cache ({type(e).__name__}). On a machine with "
            f"internet access run `huggingface-cli download {repo_id}` (or "
            f"`python -c \"import huggingface_hub as h; h.snapshot_download('{repo_id}')\"`), then copy "
            "the cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE) here."
        ) from None


def read_tl_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{path}: no config.json (a TransformerLens-style checkpoint directory needs one)")
    with open(cfg_path) as f:
        raw = json.load(f)
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ModelLoadError(f"{cfg_path}: missing keys {missing}")
    norm = raw.get("normalization_type", raw.get("normalization", "LN"))
    if raw.get("shortformer_pos", False) or raw.get("positional_embedding_type", "standard") != "standard":
        raise ModelLoadError(f"{cfg_path}: only standard positional embeddings are supported")
    cfg = {k: raw[k] for k in _REQUIRED}
    cfg.update(normalization_type=norm, attn_only=bool(raw.get("attn_only", False)),
               tokenizer_name=raw.get("tokenizer_name"), final_rms=bool(raw.get("final_rms", False)))
    return cfg


def read_tl_weights(path: str) -> dict:
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    pths = sorted(glob.glob(os.path.join(path, "*.pth")))
    finals = [p for p in pths if p.endswith("final.pth")]
    pick = finals[0] if finals else (pths[0] if len(pths) == 1 else None)
    if pick is None:
        raise ModelLoadError(
            f"{path}: no model.safetensors and {'no' if not pths else 'several'} *.pth files "
            f"({[os.path.basename(p) for p in pths][:5]}); expected one state dict"
        )
    try:
        sd = torch.load(pick, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{pick}: cannot be read as a state dict with weights_only=True ({e})") from None
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{pick}: expected a state dict, got {type(sd).__name__}")
    return sd


def _tokenizer(name: Optional[str]):
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:
        return None  # tokenizer not cached: token-id corpora still work


def load_tl_checkpoint(path: str, *, device=None, dtype: torch.dtype = torch.float32, name: Optional[str] = None):
    """A TransformerLens-style checkpoint directory -> TL 4 ``TransformerBridge`` (TL 3:
    ``HookedTransformer``), weights loaded strictly."""
    cfg = read_tl_config(path)
    tok = _tokenizer(cfg.get("tokenizer_name"))
    model = model_from_tl_state_dict(cfg, read_tl_weights(path), tokenizer=tok, dtype=dtype,
                                     name=name or os.path.basename(path.rstrip("/")), path=path)
    return model.to(device) if device is not None else model


def load_model(name: str, *, device=None, dtype: torch.dtype = torch.float32, cache_dir: Optional[str] = None):
    """``demo`` (planted GELU-4L-shaped model), ``gelu-4l`` / ``NeelNanda/GELU_4L512W_C4_Code`` (local HF
    cache only), another cached ``owner/name`` TL-style repo, or a checkpoint directory."""
    if name == "demo":
        from .demo import planted_model

        model, _ = planted_model()
        return model.to(device) if device is not None else model
    if os.path.isdir(name):
        return load_tl_checkpoint(name, device=device, dtype=dtype)
    repo = ALIASES.get(name.lower(), name)
    if "/" not in repo:
        raise ModelLoadError(f"unknown model {name!r}: use 'demo', 'gelu-4l', a cached owner/name repo or a directory")
    return load_tl_checkpoint(hf_snapshot_dir(repo, cache_dir), device=device, dtype=dtype, name=repo)
