"""Loading models by name: the real GELU-4L from the local Hugging Face cache, TransformerLens-style
checkpoint directories, Hugging Face checkpoints of any family TransformerLens 4 bridges (a directory or
a cached ``owner/name`` whose ``config.json`` names its ``architectures``), and the planted demo model.

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


def is_hf_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a Hugging Face checkpoint (its config.json names ``architectures`` and is
    not a TransformerLens-style config)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and bool(raw.get("architectures")) and not all(k in raw for k in _REQUIRED)


def load_hf_checkpoint(path: str, *, device=None, dtype: torch.dtype = torch.float32):
    """A Hugging Face checkpoint directory -> TransformerLens 4 ``TransformerBridge`` (with its tokenizer
    when the directory has one). A family per-head attribution cannot cover is refused later, by
    `erasure_fast.model_spec`, with the family and why."""
    from .tl_models import tl_major

    if tl_major() < 4:
        raise ModelLoadError(f"{path}: Hugging Face checkpoints are bridged through TransformerLens 4 "
                             "(pip install 'transformer-lens>=4')")
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    from transformers.utils import logging as hf_logging

    tok = _tokenizer(path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weights-loading bar per model; set back below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = TransformerBridge.boot_transformers(path, dtype=dtype, tokenizer=tok, device=device)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot be bridged by TransformerLens ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


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
    cache only), another cached ``owner/name`` repo, or a checkpoint directory -- TransformerLens-style, or
    a Hugging Face checkpoint of a family TransformerLens 4 bridges."""
    if name == "demo":
        from .demo import planted_model

        model, _ = planted_model()
        return model.to(device) if device is not None else model
    if os.path.isdir(name):
        if is_hf_checkpoint(name):
            return load_hf_checkpoint(name, device=device, dtype=dtype)
        return load_tl_checkpoint(name, device=device, dtype=dtype)
    repo = ALIASES.get(name.lower(), name)
    if "/" not in repo:
        raise ModelLoadError(f"unknown model {name!r}: use 'demo', 'gelu-4l', a cached owner/name repo or a directory")
    path = hf_snapshot_dir(repo, cache_dir)
    if is_hf_checkpoint(path):
        return load_hf_checkpoint(path, device=device, dtype=dtype)
    return load_tl_checkpoint(path, device=device, dtype=dtype, name=repo)
