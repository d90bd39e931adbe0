"""`ModelSpec`: what the attribution needs from a model -- weights, sizes and block layout -- in one
object, whatever interface the model came through (`erasure_fast.models`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .. import mkl_dispatch  # noqa: F401 (on import: oneMKL dispatch resolved before any parallel call)

CENTERING_NORMS = ("LN", "LNPre")  # final-norm families that centre before scaling
_SCALED_NORMS = ("LN", "LNPre", "RMS", "RMSPre")


@dataclass
class ModelSpec:
    """Weights and layout of a model, as the attribution sees them.

    Shapes: W_O [n_layers * n_heads, d_head, d_model] (layer-major heads), b_O [n_layers, d_model],
    W_U [d_model, d_vocab]. ``normalization`` is the final norm's family ("LN", "LNPre", "RMS",
    "RMSPre" or None); ``center`` says whether DLA centres (LayerNorm) and ``final_eps`` is its eps.
    """

    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    W_O: torch.Tensor
    b_O: torch.Tensor
    W_U: torch.Tensor
    normalization: Optional[str]
    final_eps: float
    has_mlps: bool = True
    n_ctx: Optional[int] = None
    kind: str = "raw"  # "bridge", "hooked" or "raw"
    # Attention and MLP read the same residual stream (GPT-NeoX, GPT-J, Phi, ...): MLP_l is not
    # downstream of layer l's heads, and there is no resid_mid point.
    parallel_blocks: bool = False
    # The stream is embed + every head's z W_O + b_O + every MLP output (False: post-norms after the
    # attention / MLP output, as in Gemma 2/3 and OLMo 2 -- residual points are then read from the
    # stream itself, not summed from the nodes).
    additive_blocks: bool = True
    family: str = ""  # the Hugging Face architecture (e.g. "LlamaForCausalLM") or TransformerLens's name
    # Block parts that write to the stream but are no node (e.g. Falcon-H1's Mamba mixer, Gemma 4's
    # per-layer input): their output is in the residual points (read from the stream), not in any PR.
    extra_writers: tuple = ()
    _directions: Optional[torch.Tensor] = field(default=None, repr=False)
    # Layouts derived from the weights for one consumer (e.g. the capture engine's fused QKV), made once
    # per spec -- a spec is remade whenever the model's weights change.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def center(self) -> bool:
        return self.normalization in CENTERING_NORMS

    @property
    def n_heads_total(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def directions(self) -> torch.Tensor:
        """W_U.T as a contiguous [d_vocab, d_model] table (made once, kept with the spec)."""
        if self._directions is None:
            self._directions = self.W_U.detach().t().contiguous()
        return self._directions

    def resid_labels(self) -> List[str]:
        """The residual-stream points: resid_pre0, then per layer resid_mid{l} and resid_post{l}
        (parallel blocks: resid_post{l} only -- their attention and MLP read the same stream;
        attention-only models: resid_post{l} only -- there is no MLP to read a mid point)."""
        kinds = ("post",) if self.parallel_blocks or not self.has_mlps else ("mid", "post")
        return ["resid_pre0"] + [f"resid_{k}{l}" for l in range(self.n_layers) for k in kinds]

    def is_downstream(self, node: int, writer_head: int) -> bool:
        """Whether node ``node`` (heads layer-major, then the MLPs) reads writer ``writer_head``'s
        output (`downstream_mask`)."""
        return is_downstream(node, writer_head, self.n_layers, self.n_heads, self.parallel_blocks)

    def downstream_mask(self, writers: torch.Tensor, n_nodes: int) -> torch.Tensor:
        """[n_nodes, W] bool: whether each node reads each writer head in ``writers`` [W]
        (module-level `downstream_mask`)."""
        return downstream_mask(writers, n_nodes, self.n_layers, self.n_heads, self.parallel_blocks)

    def head_label(self, index: int) -> str:
        return f"L{index // self.n_heads}H{index % self.n_heads}"

    def head_labels(self) -> List[str]:
        return [self.head_label(i) for i in range(self.n_heads_total)]

    def parse_head(self, spec) -> int:
        """A head given as flat index, (layer, head) pair or label "L2H3" -> flat index."""
        if isinstance(spec, str):
            s = spec.strip().upper()
            if s.startswith("L") and "H" in s:
                try:
                    layer, head = (int(p) for p in s[1:].split("H", 1))
                except ValueError:
                    raise ValueError(f"head label {spec!r} is not of the form 'L<layer>H<head>'") from None
            else:
                raise ValueError(f"head label {spec!r} is not of the form 'L<layer>H<head>'")
        elif isinstance(spec, (tuple, list)) and len(spec) == 2 and all(map(_is_int, spec)):
            layer, head = int(spec[0]), int(spec[1])
        elif _is_int(spec) or (isinstance(spec, torch.Tensor) and spec.ndim == 0 and not spec.is_floating_point()
                               and spec.dtype != torch.bool):
            index = int(spec)
            if not 0 <= index < self.n_heads_total:
                raise ValueError(f"head index {index} out of range [0, {self.n_heads_total})")
            return index
        else:
            raise TypeError(f"a head must be an int, a (layer, head) pair of ints or a label like 'L0H2'; got {spec!r}")
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise ValueError(
                f"head {spec!r} does not exist: the model has {self.n_layers} layers x {self.n_heads} heads"
            )
        return layer * self.n_heads + head

    @classmethod
    def from_weights(
        cls,
        W_O: torch.Tensor,
        b_O: torch.Tensor,
        W_U: torch.Tensor,
        *,
        normalization: Optional[str] = "LN",
        final_eps: float = 1e-5,
        has_mlps: bool = True,
    ) -> "ModelSpec":
        """Raw weights: W_O [n_layers, n_heads, d_head, d_model], b_O [n_layers, d_model],
        W_U [d_model, d_vocab]."""
        if W_O.ndim != 4:
            raise ValueError(f"W_O must have shape [n_layers, n_heads, d_head, d_model], got {list(W_O.shape)}")
        L, H, dh, D = W_O.shape
        if tuple(b_O.shape) != (L, D):
            raise ValueError(f"b_O must have shape [n_layers, d_model]=[{L}, {D}], got {list(b_O.shape)}")
        if W_U.ndim != 2 or W_U.shape[0] != D:
            raise ValueError(f"W_U must have shape [d_model, d_vocab]=[{D}, d_vocab], got {list(W_U.shape)}")
        if normalization not in (*_SCALED_NORMS, None):
            raise ValueError(f"normalization must be one of {_SCALED_NORMS} or None, got {normalization!r}")
        return cls(
            n_layers=L, n_heads=H, d_head=dh, d_model=D, d_vocab=W_U.shape[1],
            W_O=W_O.detach().reshape(L * H, dh, D).contiguous(), b_O=b_O.detach(), W_U=W_U.detach(),
            normalization=normalization, final_eps=float(final_eps), has_mlps=has_mlps,
        )


def downstream_mask(writers, n_nodes: int, n_layers: int, n_heads: int, parallel_blocks: bool) -> torch.Tensor:
    """[n_nodes, W] bool: whether node i (heads layer-major, then the MLPs) reads writer head
    ``writers[w]``'s output -- a head of a later layer; an MLP of a later layer, or of the writer's own
    layer when blocks are sequential (a parallel block's MLP reads the stream before its heads write).
    The one statement of this rule; everything else derives from it."""
    L, H = n_layers, n_heads
    node_layer = torch.cat([torch.arange(L * H) // H, torch.arange(n_nodes - L * H)])
    is_head = torch.arange(n_nodes) < L * H
    wl = torch.as_tensor(writers).cpu() // H
    later = node_layer[:, None] > wl[None, :]
    mlp_reads = later if parallel_blocks else node_layer[:, None] >= wl[None, :]
    return (is_head[:, None] & later) | (~is_head[:, None] & mlp_reads)


def is_downstream(node: int, writer_head: int, n_layers: int, n_heads: int, parallel_blocks: bool) -> bool:
    """`downstream_mask` for one node and one writer head."""
    return bool(downstream_mask([writer_head], node + 1, n_layers, n_heads, parallel_blocks)[node, 0])


def _is_int(value) -> bool:
    """An integer by kind (Python or numpy; not a bool, not a float that happens to be whole)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
