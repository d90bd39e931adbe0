"""`attribute()`: capture -> contract -> DLA, erasure measures, residual PR, adjusted DLA."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch

from .backends import get_backend
from .capture import Capture, model_device, validate_tokens
from .capture import capture as hook_capture  # the function; `capture` is the parameter naming a CaptureMode
from .capture_modes import CaptureChoice, CaptureMode
from .contract import (accumulation_dtype, cosine, projection_ratio, projection_value, require_finite_outputs,
                       run_backend, safe_div, validate)
from .deferred_checks import DeferredChecks
from .device_sync import reads_back_freely
from .engine import engine_for, engine_problem
from .models import ModelSpec, as_transformer_lens, model_spec
from .models.hooks import describe_hooks, hooks_to_run, user_hooks


@dataclass
class AttributionResult:
    """Everything `attribute` computes for a batch. B = batch, P = positions, L = layers, H = heads,
    n_nodes = L*H heads (layer-major) then the L MLPs (if included), W = writers,
    R = residual points (`ModelSpec.resid_labels`: resid_pre0, then resid_mid{l} and resid_post{l} for
    each layer; parallel attention + MLP blocks have no resid_mid).

    dla           [B, P, L, H]        next-token / target DLA of every head (NaN where no target)
    dots          [B, P, n_nodes, W]  node . r_writer
    norms         [B, P, n_nodes]     |node|^2
    pr, pv, cos   [B, P, n_nodes, W]  projection ratio / value / cosine onto each writer
    resid_pr      [B, P, R, W]        PR of the residual stream points (by linearity), or None
    writer_dla    [B, P, W]           each writer's own DLA
    adjusted_dla  [B, P, W]           DLA_w * (1 + sum of downstream nodes' PR onto w)
    downstream    [n_nodes, W] bool   nodes that read the writer (`ModelSpec.is_downstream`)
    """

    dla: torch.Tensor
    dots: torch.Tensor
    norms: torch.Tensor
    node_labels: List[str]
    writers: torch.Tensor
    writer_labels: List[str]
    resid_dots: Optional[torch.Tensor]
    resid_labels: List[str]
    downstream: torch.Tensor
    backend: str
    capture: CaptureMode = CaptureMode.HOOKS  # ENGINE or HOOKS (a str enum: compares equal to "engine" / "hooks")
    capture_reason: str = ""  # for hooks: why the engine was not used ("" when hooks were asked for)
    z: Optional[torch.Tensor] = field(default=None, repr=False)  # [B, P, L*H, d_head] captured hook_z
    final_scale: Optional[torch.Tensor] = field(default=None, repr=False)  # [B, P]
    extra: dict = field(default_factory=dict, repr=False)  # activations kept on request
    _cache: dict = field(default_factory=dict, repr=False)

    def _memo(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def capture_description(self) -> str:
        """How activations were captured, readable: "engine", "hooks" or "hooks (reason)"."""
        return str(CaptureChoice(self.capture, self.capture_reason))

    @property
    def pr(self) -> torch.Tensor:
        return self._memo("pr", lambda: projection_ratio(self.dots, self.norms, self.writers))

    @property
    def pv(self) -> torch.Tensor:
        return self._memo("pv", lambda: projection_value(self.dots, self.norms, self.writers))

    @property
    def cos(self) -> torch.Tensor:
        return self._memo("cos", lambda: cosine(self.dots, self.norms, self.writers))

    @property
    def writer_sq_norms(self) -> torch.Tensor:
        """[B, P, W] |r_w|^2."""
        return self.norms.index_select(-1, self.writers)

    @property
    def resid_pr(self) -> Optional[torch.Tensor]:
        if self.resid_dots is None:
            return None
        return self._memo("resid_pr", lambda: projection_ratio(self.resid_dots, self.norms, self.writers))

    @property
    def writer_dla(self) -> torch.Tensor:
        B, P = self.dla.shape[:2]
        return self.dla.reshape(B, P, -1).index_select(-1, self.writers)

    @property
    def downstream_pr_sum(self) -> torch.Tensor:
        """[B, P, W] sum of the downstream nodes' PR onto each writer (NaN where |r_w| = 0)."""
        # sum_n (a_n.w) / |w|^2 = (sum_n a_n.w) / |w|^2: one division, and no [.., n_nodes, W] PR formed
        return self._memo("down_sum", lambda: safe_div(_masked_node_sums(self.dots, self.downstream),
                                                       self.writer_sq_norms))

    @property
    def adjusted_dla(self) -> torch.Tensor:
        return self.writer_dla * (1 + self.downstream_pr_sum)


def _masked_node_sums(dots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over n of dots[..., n, w] * mask[n, w]: dots [..., n_nodes, W], mask [n_nodes, W] -> [..., W].
    One GEMM against the mask laid on diagonals ([n_nodes * W, W]), reading the dots in place; where
    a dot is not finite its zero weights would carry NaN into every writer's sum, so those inputs
    take the element-wise path, which keeps it to its own writer. Where checking that would wait for
    the device (a GPU: `reads_back_freely`), the element-wise path is the only one (memory-bound there)."""
    N, W = dots.shape[-2:]
    mask = mask.to(dots.dtype)
    if not reads_back_freely(dots.device):
        return (dots * mask).sum(dim=-2)
    spread = torch.diag_embed(mask).reshape(N * W, W)  # [(n, w), w'] = mask[n, w] * (w == w')
    out = (dots.reshape(-1, N * W) @ spread).reshape(*dots.shape[:-2], W)
    if not bool(torch.isfinite(out).all()):
        out = (dots * mask).sum(dim=-2)
    return out


def resolve_writers(writers, spec: ModelSpec, name: str = "writers") -> torch.Tensor:
    """[W] int64 flat head indices from "all", one head or a list of heads (flat index, (layer, head)
    pair or label "L0H2"). Raises ValueError for an empty list, a head that does not exist, a head
    named twice (its rows would be duplicates, and labels would no longer identify them), or a bare
    pair of ints, which could be either a list of two flat indices or one (layer, head)."""
    if isinstance(writers, str) and writers == "all":
        return torch.arange(spec.n_heads_total)
    if isinstance(writers, tuple) and len(writers) == 2 and all(isinstance(x, numbers.Integral) for x in writers):
        a, b = writers  # a list of two flat indices, or one (layer, head)? Both spellings exist; say which
        raise ValueError(f"{name}={writers!r} is ambiguous: pass [({a}, {b})] for head L{a}H{b}, or [{a}, {b}] for the "
                         f"heads with flat indices {a} and {b}")
    if isinstance(writers, (str, numbers.Integral)):
        writers = [writers]
    if isinstance(writers, torch.Tensor):
        writers = writers.reshape(-1).tolist()
    try:
        items = list(writers)
    except TypeError:
        raise TypeError(f"{name} must be 'all', a head or a list of heads (index, (layer, head) or 'L0H2'); got {writers!r}") from None
    if not items:
        raise ValueError(f"{name} is empty; name at least one head or pass 'all'")
    idx = [spec.parse_head(w) for w in items]
    seen = {}
    for item, i in zip(items, idx):
        if i in seen:
            raise ValueError(f"{name} names head {spec.head_label(i)} twice ({seen[i]!r} and {item!r}); list each head once")
        seen[i] = item
    return torch.tensor(idx, dtype=torch.int64)


def target_ids(targets, tokens: torch.Tensor, spec: ModelSpec, name: str = "targets", allow_next: bool = True) -> torch.Tensor:
    """[B, P] int64 ids (-1 = no target) from "next", an int, [B] or [B, P] tokens."""
    B, P = tokens.shape
    forms = ('"next", ' if allow_next else "") + "an int, [batch] or [batch, pos] token ids"
    if isinstance(targets, str):
        if targets != "next" or not allow_next:
            raise ValueError(f"{name} must be {forms}; got {targets!r}")
        ids = torch.full((B, P), -1, dtype=torch.int64, device=tokens.device)
        ids[:, :-1] = tokens[:, 1:]
        return ids
    if isinstance(targets, int):
        t = torch.tensor(targets)
    elif isinstance(targets, torch.Tensor):
        t = targets
    else:
        raise TypeError(f"{name} must be {forms}; got {type(targets).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    t = t.to(tokens.device, torch.int64)
    if t.ndim == 0:
        ids = t.expand(B, P)
    elif t.ndim == 1 and t.shape[0] == B:
        ids = t[:, None].expand(B, P)
    elif t.ndim == 2 and tuple(t.shape) == (B, P):
        ids = t
    else:
        raise ValueError(f"{name} must be an int, [batch]=[{B}] or [batch, pos]=[{B}, {P}] tokens; got shape {list(t.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= spec.d_vocab:
        raise ValueError(f"{name} must lie in [0, d_vocab={spec.d_vocab}), got values in [{lo}, {hi}]")
    return ids.contiguous()


def _resid_dots(cap: Capture, spec: ModelSpec, node_dots: torch.Tensor, embed_dots: torch.Tensor,
                writers: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Dots of the residual points (`ModelSpec.resid_labels`) with each writer, by linearity. [T, R, W]
    (``writers`` [W] head indices, read on the host)."""
    L, H = spec.n_layers, spec.n_heads
    T = node_dots.shape[0]
    # b_O[l] . r_w = z_w . (W_O[w] b_O[l]): the bias enters through head space, never as a d_model vector.
    every_head = writers.tolist() == list(range(L * H))
    W_Ow = spec.W_O if every_head else spec.W_O.index_select(0, writers.to(spec.W_O.device))
    u = torch.einsum("whd,ld->wlh", W_Ow.to(acc), spec.b_O.to(acc))  # [W, L, dh]
    z = cap.z.reshape(T, L * H, -1)
    zw = (z if every_head else z.index_select(1, writers.to(cap.z.device))).to(acc)  # [T, W, dh], no copy for all heads
    # [W, L, dh] x [W, dh, T]: z read in place as each writer's [dh, T] matrix (3x faster than the
    # einsum's [T, W, dh] x [W, dh, L] on CPU, same numbers); [T, L, W] as a view
    bias_dots = torch.bmm(u, zw.permute(1, 2, 0)).permute(2, 1, 0)
    head_dots = node_dots[:, : L * H].reshape(T, L, H, -1).sum(dim=2)  # [T, L, W]
    mlp_dots = node_dots[:, L * H:] if spec.has_mlps else None
    points = [embed_dots]
    cur = embed_dots
    for l in range(L):
        cur = cur + head_dots[:, l] + bias_dots[:, l]
        if mlp_dots is not None:
            if not spec.parallel_blocks:
                points.append(cur)  # resid_mid{l}
            cur = cur + mlp_dots[:, l]
        points.append(cur)  # resid_post{l}
    return torch.stack(points, dim=1)


def attribute(
    model,
    tokens: torch.Tensor,
    *,
    writers="all",
    targets: Union[str, int, torch.Tensor] = "next",
    incorrect: Union[None, int, torch.Tensor] = None,
    include_mlps: bool = True,
    backend: str = "auto",
    capture: Union[str, CaptureMode] = "auto",
) -> AttributionResult:
    """DLA and erasure measures for a TransformerLens model on ``tokens``.

    Args:
        model: TransformerLens 4.x ``TransformerBridge`` or 3.x ``HookedTransformer``, a Hugging Face
            ``transformers`` causal LM or an nnsight ``LanguageModel`` / ``TransformersModel`` (both bridged through
            TransformerLens 4's adapters; `erasure_fast.models`). Layouts without per-head attention
            outputs are refused with `UnsupportedModelError` before any work.
        tokens: [batch, pos] (or [pos]) integer token ids in [0, d_vocab).
        writers: "all", or heads as flat indices, (layer, head) pairs or labels like "L0H2".
        targets: "next" (the following token; the last position gets NaN), an int (one token for
            every position), [batch] (one per prompt) or [batch, pos] token ids.
        incorrect: optional int / [batch] / [batch, pos] tokens; DLA becomes logit-difference DLA.
        include_mlps: add the MLP outputs as nodes and the residual points (``resid_pr``); an
            attention-only model has no MLP nodes but gets its residual points all the same.
        backend: "auto", "torch", "cpp" or "triton".
        capture: how activations are obtained: "engine" (no hook machinery: the forward from the weights,
            or a Hugging Face model's own modules with SDPA; `erasure_fast.engine`), "hooks" (TransformerLens's hooks) or "auto" (the engine where it
            covers the model, else hooks; ``result.capture`` says which, ``result.capture_reason`` why), or the `CaptureMode` member. A model with hooks
            attached is analysed through them on hooks (``capture="engine"`` is refused), or refused
            naming the hook where it cannot be (`erasure_fast.models.hooks`).

    Returns:
        `AttributionResult` (shapes in its docstring). Matches TransformerLens's ``logit_attrs`` on
        ``stack_head_results(layer=-1, apply_ln=False)`` and the paper's projection ratio.
    """
    model = as_transformer_lens(model)
    spec = model_spec(model)
    tokens = validate_tokens(tokens, spec)
    wr = resolve_writers(writers, spec)
    ids = target_ids(targets, tokens, spec, "targets", allow_next=True)
    inc = None
    if incorrect is not None:
        inc = target_ids(incorrect, tokens, spec, "incorrect", allow_next=False)
        inc = torch.where(ids < 0, ids, inc)
    impl = get_backend(backend, model_device(model), spec.W_O.dtype)
    mode = resolve_capture(capture, model, spec)
    return run_attribution(model, spec, tokens, wr, ids, inc, include_mlps=include_mlps, impl=impl, capture_mode=mode)


def resolve_capture(capture: Union[str, CaptureMode], model, spec: ModelSpec) -> CaptureChoice:
    """``capture`` (a `CaptureMode` or its value "auto", "engine", "hooks") checked against the model:
    a `CaptureChoice` of ENGINE, or of HOOKS with the reason -- why the engine is not used (auto), or
    the model's own hooks that capture runs through (`erasure_fast.models.hooks`); ``str()`` of it reads
    "engine", "hooks" or "hooks (reason)". Asking for the engine where it does not cover the model or
    where the model has hooks attached, and hooks the forward pass cannot run, are ValueErrors naming
    the reason, before any work."""
    mode = CaptureMode.parse(capture)
    hooks = hooks_to_run(model)
    if hooks:
        if mode is CaptureMode.ENGINE:
            raise ValueError(f"capture='engine': the model has hooks attached ({describe_hooks(hooks)}), which the "
                             "engine does not run; capture='hooks' (or 'auto') runs the model through them")
        return CaptureChoice(CaptureMode.HOOKS, f"through the model's own hooks: {describe_hooks(hooks)}")
    if mode is CaptureMode.HOOKS:
        return CaptureChoice(CaptureMode.HOOKS)
    problem = engine_problem(model, spec)
    if problem is None:
        return CaptureChoice(CaptureMode.ENGINE)
    if mode is CaptureMode.ENGINE:
        raise ValueError(f"capture='engine': {problem}")
    return CaptureChoice(CaptureMode.HOOKS, problem)


def run_attribution(model, spec: ModelSpec, tokens: torch.Tensor, wr: torch.Tensor, ids: torch.Tensor,
                    inc: Optional[torch.Tensor], *, include_mlps: bool, impl, extra_hooks=(), keep_hooks=(),
                    scale_override: Optional[torch.Tensor] = None, keep_mlp_out: bool = False,
                    capture_mode: Union[CaptureChoice, CaptureMode, str] = CaptureMode.HOOKS,
                    deferred: Optional[DeferredChecks] = None) -> AttributionResult:
    """`attribute` after argument checking: tokens [B, P] valid ids, wr [W] head indices,
    ids / inc [B, P] target ids (-1 = none), impl a `Backend` (`erasure_fast.backends.get_backend`). ``extra_hooks`` are interventions
    run during the forward pass, ``keep_hooks`` activations to keep (``result.extra``; with
    ``keep_mlp_out`` also ``extra["mlp_out"]`` [B, P, L, d_model], the MLP nodes' vectors) and
    ``scale_override`` [B, P] a final-LN scale to use instead of the run's own (e.g. the clean one).
    ``capture_mode`` is `resolve_capture`'s answer (or a resolved mode); interventions always run on hooks.
    ``deferred``: the input and output checks are recorded there, not read (`erasure_fast.contract.validate`;
    the caller has checked W_O and the directions), and with ``wr`` on the host nothing here waits for a GPU."""
    choice = CaptureChoice.of(capture_mode)
    with_mlps = include_mlps and spec.has_mlps
    with_resid = include_mlps  # every node that writes to the stream (an attention-only model has no MLPs)
    if choice.mode is CaptureMode.ENGINE and not extra_hooks and not keep_hooks:
        cap = engine_for(model, spec).capture(spec, tokens.to(model_device(model)), include_mlps=with_mlps,
                                              include_embed=with_resid)
    else:
        if choice.mode is CaptureMode.ENGINE:
            choice = CaptureChoice(CaptureMode.HOOKS, "interventions run on hooks")
        # a hook of the user's may make the stream other than the sum of the nodes: read its points
        cap = hook_capture(model, tokens, spec, include_mlps=with_mlps, include_embed=with_resid,
                      extra_hooks=extra_hooks, keep_hooks=keep_hooks, stream_points=bool(user_hooks(model)))
    if scale_override is not None:
        cap.scale = scale_override.to(cap.scale)
    B, P = tokens.shape
    T = B * P
    L, H = spec.n_layers, spec.n_heads
    if with_mlps and with_resid and cap.stream_nodes is not None and cap.resid_points is None:
        extra = cap.stream_nodes.reshape(T, L + 1, -1)  # mlp_out then embed: already one block
    else:
        parts = []
        if with_mlps:
            parts.append(cap.mlp_out.reshape(T, L, -1))
        if with_resid:
            if cap.embed is not None:
                parts.append(cap.embed.reshape(T, 1, -1))
            if cap.resid_points is not None:  # non-additive blocks: the stream itself, dotted in the kernel
                parts.append(cap.resid_points.reshape(T, cap.resid_points.shape[2], -1))
        extra = torch.cat(parts, dim=1) if parts else None
    dev = cap.z.device
    dtype = cap.z.dtype
    inputs = validate(
        cap.z.reshape(T, L * H, -1),
        spec.W_O.to(dev, dtype),
        spec.directions.to(dev, dtype),
        cap.scale.reshape(T),
        wr,
        None if extra is None else extra.to(dtype),
        direction_ids=ids.reshape(T).to(dev),
        incorrect_ids=None if inc is None else inc.reshape(T).to(dev),
        center=spec.center,
        deferred=deferred,
        checks_in_run=True,
    )
    out = run_backend(impl, inputs)  # with deferred checks, the outputs' are recorded here
    if deferred is not None:
        require_finite_outputs(inputs, out, deferred)
    acc = accumulation_dtype(dtype)
    n_nodes = L * H + (L if with_mlps else 0)
    dots = out.dots[:, :n_nodes]
    resid = None
    labels_resid: List[str] = []
    if with_resid and cap.embed is not None:
        labels_resid = spec.resid_labels()
        if cap.resid_points is not None:
            resid = out.dots[:, n_nodes + 1: n_nodes + 1 + len(labels_resid)]
        else:  # additive blocks: the points are sums of the nodes (and b_O), so their dots are too
            resid = _resid_dots(cap, spec, dots, out.dots[:, n_nodes], wr, acc)
        resid = resid.reshape(B, P, len(labels_resid), -1)
    node_labels = spec.head_labels() + ([f"MLP{l}" for l in range(L)] if with_mlps else [])
    return AttributionResult(
        dla=out.dla.reshape(B, P, L, H),
        dots=dots.reshape(B, P, n_nodes, -1),
        norms=out.norms[:, :n_nodes].reshape(B, P, n_nodes),
        node_labels=node_labels,
        writers=wr.to(dev),
        writer_labels=[spec.head_label(w) for w in wr.tolist()],
        resid_dots=resid,
        resid_labels=labels_resid,
        downstream=spec.downstream_mask(wr, n_nodes).to(dev),
        backend=impl.NAME,
        capture=choice.mode,
        capture_reason=choice.reason,
        z=cap.z,
        final_scale=cap.scale,
        extra=dict(cap.extra or {}, **({"mlp_out": cap.mlp_out} if keep_mlp_out and cap.mlp_out is not None else {})),
    )
