"""Tiny random Hugging Face models of the decoder-only families, built offline (no download), and their
TransformerLens 4 bridges: the fixtures of tests/test_families.py.

Every family gets the same small shape -- 2 layers, 4 query heads (2 key/value heads where the family
has grouped-query attention), d_model 32, d_head 8, vocabulary 97 -- and non-trivial norm weights and
biases (1-D parameters perturbed), so that unprocessed weights, centring and biases all matter."""

from __future__ import annotations

import os
import warnings

import torch

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64, head_dim=8)
# HF model class -> (config class, config arguments)
FAMILIES = {
    "GPT2LMHeadModel": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64)),
    "GPTNeoForCausalLM": ("GPTNeoConfig", dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                                               attention_types=[[["global", "local"], 1]], window_size=8, intermediate_size=64)),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25)),
    "GPTJForCausalLM": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, n_inner=64)),
    "OPTForCausalLM": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                         max_position_embeddings=64, word_embed_proj_dim=32)),
    "BloomForCausalLM": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    "LlamaForCausalLM": ("LlamaConfig", COMMON),
    "MistralForCausalLM": ("MistralConfig", COMMON),
    "MixtralForCausalLM": ("MixtralConfig", dict(COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "Qwen2ForCausalLM": ("Qwen2Config", COMMON),
    "Qwen3ForCausalLM": ("Qwen3Config", COMMON),
    "GemmaForCausalLM": ("GemmaConfig", COMMON),
    "Gemma2ForCausalLM": ("Gemma2Config", COMMON),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", COMMON),
    "PhiForCausalLM": ("PhiConfig", dict(COMMON, partial_rotary_factor=0.5)),
    "Phi3ForCausalLM": ("Phi3Config", dict(COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
    "OlmoForCausalLM": ("OlmoConfig", COMMON),
    "Olmo2ForCausalLM": ("Olmo2Config", COMMON),
    "StableLmForCausalLM": ("StableLmConfig", COMMON),
    "Starcoder2ForCausalLM": ("Starcoder2Config", COMMON),
    "GPTBigCodeForCausalLM": ("GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
                                                       multi_query=True)),
}


# Every other decoder-only text family of TransformerLens's adapter registry gets the same small shape
# through the generic arguments below (each config class takes the ones it knows).
GENERIC = dict(COMMON, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
               num_experts_per_tok=2, n_shared_experts=1, shared_expert_intermediate_size=32, pad_token_id=0,
               bos_token_id=1, eos_token_id=1, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
               num_layers=2, num_heads=4, ffn_dim=64, n_ctx=64, max_seq_len=64, seq_length=64,
               mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1)
# Per-family arguments: hybrid families keep one layer of each kind, as the real checkpoints mix them;
# Granite's multipliers are set away from 1 so that their place in the stream is tested.
FAMILY_ARGS = {
    "GraniteForCausalLM": dict(residual_multiplier=0.5, embedding_multiplier=3.0, attention_multiplier=0.2,
                               logits_scaling=2.0),
    "GraniteMoeForCausalLM": dict(residual_multiplier=0.5, embedding_multiplier=3.0, attention_multiplier=0.2,
                                  logits_scaling=2.0),
    "Lfm2ForCausalLM": dict(full_attn_idxs=[1]),
    "Lfm2MoeForCausalLM": dict(layer_types=["conv", "full_attention"]),
    "BambaForCausalLM": dict(attn_layer_indices=[1]),
    "GraniteMoeHybridForCausalLM": dict(layer_types=["mamba", "attention"]),
    "Zamba2ForCausalLM": dict(layer_types=["mamba", "hybrid"]),
    "JambaForCausalLM": dict(attn_layer_period=2, attn_layer_offset=1),
    "FalconH1ForCausalLM": dict(mamba_d_ssm=64),
    "Qwen3NextForCausalLM": dict(layer_types=["linear_attention", "full_attention"]),
    "Qwen3_5ForCausalLM": dict(layer_types=["linear_attention", "full_attention"]),
    "Qwen3_5MoeForCausalLM": dict(layer_types=["linear_attention", "full_attention"]),
}
# Model classes that are not decoder-only text generators despite their names.
NOT_DECODER_TEXT = {"BertLMHeadModel"}


def registry_families() -> list:
    """Decoder-only text families of TransformerLens 4's architecture-adapter registry whose model class
    the installed transformers has (encoder-decoder, vision, audio and multimodal classes are not)."""
    import transformers
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(a for a in SUPPORTED_ARCHITECTURES if a.endswith(("ForCausalLM", "LMHeadModel"))
                  and a not in NOT_DECODER_TEXT and hasattr(transformers, a))


def tiny_config(arch: str):
    """The family's config at the small shape: hand-written for the families above, generic otherwise
    (arguments the config class rejects are dropped one by one, so each class keeps what it takes)."""
    import inspect

    import transformers

    if arch in FAMILIES:
        cfg_name, kwargs = FAMILIES[arch]
        return getattr(transformers, cfg_name)(**kwargs)
    config_class = getattr(transformers, arch).config_class
    accepted = set(inspect.signature(config_class.__init__).parameters)
    defaults = config_class()
    kwargs = {}
    for key, value in {**GENERIC, **FAMILY_ARGS.get(arch, {})}.items():
        try:
            known = key in accepted or hasattr(defaults, key)
        except Exception:  # per-layer attributes raise on the global config
            known = False
        if known:
            kwargs[key] = value
    for _ in range(len(kwargs) + 1):
        try:
            return config_class(**kwargs)
        except Exception as e:  # drop the argument the class refuses (read-only properties, validators)
            culprit = next((k for k in kwargs if f"'{k}'" in str(e) or f" {k} " in str(e)), None)
            if culprit is None:
                raise
            del kwargs[culprit]
    raise RuntimeError(f"{arch}: no small config")


def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (w0 ... w94, [UNK], [EOS])."""
    from erasure_fast.bench.hf_capture import word_tokenizer as words

    return words(VOCAB - 2)


def save_family(arch: str, folder: str, seed: int = 0) -> str:
    """Write a random tiny model of ``arch`` and the word tokenizer to ``folder``; returns it."""
    import transformers

    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:  # norm weights and biases away from their 1 / 0 initialisation
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


class SavedFamilies(dict):
    """arch -> the folder of its saved tiny model (`save_family`) under ``root``, written on first use."""

    def __init__(self, root: str):
        super().__init__()
        self.root = str(root)

    def __missing__(self, arch: str) -> str:
        self[arch] = save_family(arch, os.path.join(self.root, arch))
        return self[arch]


def boot_bridge(folder: str, dtype=torch.float32):
    """The TransformerLens 4 bridge of a saved model (offline: the folder holds config and weights)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    # the word-level tokenizer itself: AutoTokenizer would pick the family's own class (e.g.
    # Qwen2Tokenizer), which re-tokenises the fixture's vocabulary its own way
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(folder, dtype=dtype, tokenizer=tokenizer)
    bridge.eval()
    return bridge
