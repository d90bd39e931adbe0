"""C1 for Hugging Face families: hook capture through the TransformerLens 4 bridge against the
`hf_modules` capture engine, on random-weight `transformers` models of the GELU-4L size (d_model 512,
4 layers, 8 heads of 64, MLP 2048; each family keeps its own blocks: RMSNorm, rotary, gated MLPs,
parallel attention + MLP, post-norms). Built offline from configs: no download.

The model is bridged the way a user's plain `transformers` model is (`erasure_fast.models.hf`), so the
rows time exactly what `attribute(hf_model, ...)` / `scan` run for the capture.
"""

from __future__ import annotations

import tempfile
from typing import Callable, Dict, List

import torch

# family -> (model class, config class, config arguments beyond the shared size)
HF_FAMILIES: Dict[str, tuple] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=8, hidden_act="silu")),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(rotary_pct=0.25, use_parallel_residual=True)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(num_key_value_heads=8, head_dim=64, sliding_window=4096)),
}
_SIZE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048,
             vocab_size=48262, max_position_embeddings=1024)
_GATED = {"llama", "gemma2"}  # three MLP matrices instead of two


def check_families(families) -> List[str]:
    """The family names, checked (ValueError naming the known ones)."""
    families = [families] if isinstance(families, str) else list(families or [])
    unknown = [f for f in families if f not in HF_FAMILIES]
    if unknown:
        raise ValueError(f"unknown c1_families {unknown}; choose from {sorted(HF_FAMILIES)}")
    return families


def word_tokenizer(n_words: int):
    """A word-level tokenizer over [UNK], [EOS] and the words w0 ... w{n_words - 1} (ids 0, 1, 2 ...),
    [EOS] doubling as BOS and padding: what offline benchmarks and tests tokenize with when no real
    tokenizer can be downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]"] + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", bos_token="[EOS]",
                                   pad_token="[EOS]")


def _tokenizer(folder: str):
    """`word_tokenizer` saved to and loaded from ``folder`` (the bridge needs one, and TransformerLens
    reloads it by its path while booting; the capture reads token ids only)."""
    from transformers import PreTrainedTokenizerFast

    word_tokenizer(30).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def build(family: str, device, dtype: torch.dtype, seed: int = 0):
    """(bridge, spec) of a random ``family`` model at the GELU-4L size, on ``device`` in ``dtype``."""
    import transformers

    from ..models import model_spec
    from ..models.hf import bridge_of_hf

    cls_name, cfg_name, extra = HF_FAMILIES[family]
    config = getattr(transformers, cfg_name)(**_SIZE, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval().to(device=device, dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        bridge = bridge_of_hf(model, tokenizer=_tokenizer(folder))
    return bridge, model_spec(bridge)


def forward_flops(family: str, n_tokens: int, seq: int = 1024) -> int:
    """Nominal FLOPs of the forward without unembedding (as `workloads.forward_flops`, gated MLPs
    counting three matrices)."""
    D, L, H, d_mlp = _SIZE["hidden_size"], _SIZE["num_hidden_layers"], _SIZE["num_attention_heads"], _SIZE["intermediate_size"]
    dh = D // H
    mlp = 2 * D * d_mlp * (3 if family in _GATED else 2)
    per_layer = 2 * D * 3 * H * dh + 2 * H * dh * D + mlp + 2 * 2 * H * dh * (seq + 1) / 2
    return int(n_tokens * L * per_layer)


def capture_functions(family: str, device, dtype: torch.dtype, corpus, batch_size: int
                      ) -> Dict[str, Callable[..., None]]:
    """{"transformer_lens hooks": fn, "erasure_fast engine": fn}; ``fn(rows=None)`` captures every
    batch of ``corpus[:rows]`` ([rows, seq] token ids) once. RuntimeError (with the reason) when the
    engine does not cover the family here."""
    from ..capture import capture, validate_tokens
    from ..engine import engine_for, engine_problem

    bridge, spec = build(family, device, dtype)
    problem = engine_problem(bridge, spec)
    if problem is not None:
        raise RuntimeError(f"engine does not cover {family}: {problem}")
    engine = engine_for(bridge, spec)

    def batches(rows):
        for lo in range(0, len(corpus) if rows is None else rows, batch_size):
            yield validate_tokens(torch.from_numpy(corpus[lo:lo + batch_size]).long().to(device), spec)

    def hooks(rows=None):
        for toks in batches(rows):
            capture(bridge, toks, spec)

    def engine_run(rows=None):
        for toks in batches(rows):
            engine.capture(spec, toks)

    return {"transformer_lens hooks": hooks, "erasure_fast engine": engine_run}
