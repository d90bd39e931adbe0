"""Block layout facts of a TransformerLens model, read from its structure before any forward pass, and
the refusals for what per-head attribution cannot cover. One place for what differs between families:

- parallel blocks (GPT-NeoX, GPT-J, Phi, Falcon, Cohere, CodeGen): attention and MLP read the same
  stream -- no resid_mid point, and MLP_l is not downstream of layer l's heads;
- post-norm blocks (Gemma 2/3/4, OLMo 2/3, EXAONE 4, GLM-4): the block normalises the attention / MLP
  output before adding it, so the stream is not the sum of the nodes -- residual points are read from it;
- parts that write to the stream but are no node (Falcon-H1's Mamba mixer, Gemma 4's per-layer input):
  also residual points read from the stream;
- residual multipliers (Granite): a head's contribution to the stream is the multiplier times z W_O,
  so W_O and b_O are taken scaled (as TransformerLens's ``stack_head_results`` and ``hook_mlp_out``);
- refused: layers without attention heads (state-space, recurrent, convolution, linear attention:
  Mamba, RWKV, Jamba, LFM2, Qwen3-Next, ...), models without one stack of blocks (HRM), post-LN
  transformers that renormalise the stream itself (GPT-1), and attention without a per-head output
  projection (multi-head latent attention, Gemma 4's per-layer geometry: `tl.spec_from_tl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


class UnsupportedModelError(ValueError):
    """A model that per-head attribution cannot cover; the message names the family and why."""


# Block parts the attribution models: attention (each head a node), the MLP (one node, a mixture of
# experts included) and the norms around them. Anything else that a block holds writes to the stream
# outside the nodes.
_NODE_PARTS = {"attn", "mlp"}
_NORM_PARTS = {"ln1", "ln2", "ln1_post", "ln2_post"}
_INTERNAL = {"original_component", "_original_component"}
# Families whose head output z (TransformerLens's hook_z, the input of W_O) is not the head's attention
# pattern times its values: family -> (whether the step between them mixes heads, what it is).
HEAD_OUTPUT_NOT_PATTERN_TIMES_VALUES: Dict[str, Tuple[bool, str]] = {
    "AfmoeForCausalLM": (False, "an output gate (a sigmoid of the layer input) scales each head's attention-weighted values before W_O"),
    "LagunaForCausalLM": (False, "an output gate (a softplus of the layer input) scales each head's attention-weighted values before W_O"),
    "BitNetForCausalLM": (True, "a norm over all heads together (attn_sub_norm) rescales the attention-weighted values before W_O"),
}

# Families whose norms sit on the residual stream itself after each add (the original post-LN
# transformer): the stream is renormalised inside every block, so no head output is an additive part
# of the final stream that the unembedding reads.
_POST_LN_STREAM = {"OpenAIGPTLMHeadModel": "GPT-1"}


@dataclass(frozen=True)
class BlockLayout:
    """What a model's blocks are: ``parallel`` attention + MLP, ``post_norms`` on their outputs,
    ``extra_writers`` (block parts outside the nodes that write to the stream) and ``residual_scale``
    (Granite's residual_multiplier: a head's contribution to the stream is that times z W_O)."""

    parallel: bool
    post_norms: bool
    extra_writers: tuple
    residual_scale: float = 1.0  # what the block multiplies attention / MLP outputs by before adding them

    @property
    def additive(self) -> bool:
        """Whether the stream is the sum of the nodes (embedding, heads, b_O, MLPs)."""
        return not self.post_norms and not self.extra_writers


def family_name(model, kind: str) -> str:
    """The Hugging Face architecture a TransformerLens model bridges, else TransformerLens's name for it."""
    if kind == "bridge":
        hf = getattr(model, "original_model", None)
        archs = getattr(getattr(hf, "config", None), "architectures", None)
        if archs:
            return str(archs[0])
        if hf is not None and type(hf).__name__ not in ("Module", "NativeModel"):
            return type(hf).__name__
    cfg = model.cfg
    return str(getattr(cfg, "original_architecture", None) or getattr(cfg, "model_name", None) or type(model).__name__)


def _block_parts(block) -> list:
    return sorted(n for n, _ in block.named_children() if not n.startswith("hook_") and n not in _INTERNAL)


def block_layout(model, kind: str, has_mlps: bool) -> BlockLayout:
    """The `BlockLayout` of a TransformerLens model (``kind`` "bridge" or "hooked"); raises
    `UnsupportedModelError` for what the attribution cannot cover -- before any forward pass."""
    cfg = model.cfg
    family = family_name(model, kind)
    if kind == "hooked":
        return BlockLayout(parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
                           post_norms=bool(getattr(cfg, "use_normalization_before_and_after", False)),
                           extra_writers=())
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        parts = [n for n, _ in model.named_children() if not n.startswith("_")]
        raise UnsupportedModelError(
            f"{family}: TransformerLens bridges it without one stack of transformer blocks (it has {parts}); "
            "per-head attribution needs blocks.{l}.attn heads that each write to one residual stream")
    if family in _POST_LN_STREAM:
        raise UnsupportedModelError(
            f"{family}: a post-LN transformer ({_POST_LN_STREAM[family]} normalises the residual stream itself after "
            "each attention and MLP add) -- the stream is renormalised inside every block, so a head's output is "
            "no additive part of the final residual stream and DLA / erasure as defined here do not apply")
    hooks = model.hook_dict
    n_layers = len(blocks)
    no_heads = [l for l in range(n_layers) if f"blocks.{l}.attn.hook_z" not in hooks]
    if no_heads:
        mixers = sorted({p for l in no_heads for p in _block_parts(blocks[l]) if p not in _NORM_PARTS | {"mlp"}})
        if "attn" in mixers:
            what = ("their attention has no per-head output in TransformerLens (no hook_z: e.g. a mixture of "
                    "attention heads, or hyper-connections around it)")
        else:
            what = (f"their mixer ({', '.join(mixers) or 'not exposed by TransformerLens'}) is a state-space, "
                    "recurrent, convolution or linear-attention layer")
        raise UnsupportedModelError(
            f"{family}: layer(s) {no_heads} of {n_layers} have no attention heads with a per-head output; {what} "
            "-- such a layer writes to the residual stream without heads, so per-head DLA and erasure are "
            "undefined there")
    if has_mlps:
        no_mlp = [l for l in range(n_layers) if f"blocks.{l}.hook_mlp_out" not in hooks]
        if no_mlp:
            raise UnsupportedModelError(f"{family}: layer(s) {no_mlp} have no MLP output (blocks.<l>.hook_mlp_out)")
    parts = set().union(*(_block_parts(b) for b in blocks))
    extra = sorted(parts - _NODE_PARTS - _NORM_PARTS)
    scales = {float(getattr(b, "residual_contribution_scale", 1.0)) for b in blocks}
    if len(scales) != 1:
        raise UnsupportedModelError(f"{family}: its blocks scale their outputs differently ({sorted(scales)})")
    return BlockLayout(parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
                       post_norms=bool(parts & {"ln1_post", "ln2_post"}), extra_writers=tuple(extra),
                       residual_scale=scales.pop())
