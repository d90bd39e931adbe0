"""The embedded default: a GELU-4L-shaped model with a planted erasure circuit, and a synthetic corpus."""

from __future__ import annotations


import torch

GELU_4L_SHAPE = dict(d_model=512, n_layers=4, n_heads=8, d_head=64, d_mlp=2048, d_vocab=48262, n_ctx=1024)


def gelu4l_shaped_bridge(seed: int = 0, **overrides):
    """A randomly initialised TransformerLens 4 bridge with GELU-4L's shape (no download needed)."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401 (registers boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    dims = {**GELU_4L_SHAPE, **overrides}
    cfg = TransformerBridgeConfig(
        **dims, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", seed=seed
    )
    model = TransformerBridge.boot_native(cfg)
    model.eval()
    return model


def random_tl_state_dict(dims: dict, seed: int = 0) -> dict:
    """Random weights in HookedTransformer naming (the layout of NeelNanda/* checkpoints).
    Weights ~ N(0, (0.8 / sqrt(d_model))^2) as TransformerLens initialises, LN weight 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    D, L, H, dh, F, V, C = (dims[k] for k in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"))
    std = 0.8 / D**0.5

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"embed.W_E": rnd(V, D), "pos_embed.W_pos": rnd(C, D)}
    for l in range(L):
        p = f"blocks.{l}."
        sd.update({
            p + "ln1.w": torch.ones(D), p + "ln1.b": torch.zeros(D),
            p + "attn.W_Q": rnd(H, D, dh), p + "attn.W_K": rnd(H, D, dh), p + "attn.W_V": rnd(H, D, dh),
            p + "attn.W_O": rnd(H, dh, D),
            p + "attn.b_Q": torch.zeros(H, dh), p + "attn.b_K": torch.zeros(H, dh), p + "attn.b_V": torch.zeros(H, dh),
            p + "attn.b_O": torch.zeros(D),
            p + "ln2.w": torch.ones(D), p + "ln2.b": torch.zeros(D),
            p + "mlp.W_in": rnd(D, F), p + "mlp.b_in": torch.zeros(F), p + "mlp.W_out": rnd(F, D), p + "mlp.b_out": torch.zeros(D),
        })
    sd.update({"ln_final.w": torch.ones(D), "ln_final.b": torch.zeros(D), "unembed.W_U": rnd(D, V), "unembed.b_U": torch.zeros(V)})
    return sd


def model_from_state_dict(dims: dict, sd: dict, name: str = "native", processing: str = "raw"):
    """TL 4 bridge (TL 3: HookedTransformer) with GELU / LayerNorm config ``dims`` and
    HookedTransformer-named weights ``sd``, raw or processed as ``from_pretrained`` does (``processing``,
    `erasure_fast.tl_models.from_pretrained_processing`)."""
    from .tl_models import model_from_tl_state_dict

    cfg = dict(dims, act_fn="gelu", normalization_type="LN", attn_only=False)
    return model_from_tl_state_dict(cfg, sd, name=name, processing=processing)


PLANTED = {"writer": "L0H2", "erasers": {"L2H3": -0.8, "L2H6": -0.4}, "bos": 0, "writer_norm": 4.0}

# Ground truth for the scan's ranking (tests/test_ranking.py, benchmarks/ranking_ground_truth.py):
# the planted (eraser, writer) pairs must rank first, in the order of their targets; "null" plants
# nothing. "decoys": a strongly erased large writer among small-norm writers (a big eraser has a
# large PR onto them by accident) and a large noisy node with a small constant component along the
# writer (median PR -1.3, beyond the true eraser's -1.0).
PLANTED_VARIANTS = {
    "demo": PLANTED,
    "decoys": dict(PLANTED, writer_norm=8.0, erasers={"L2H3": -1.0},
                   quiet_heads={f"L0H{h}": 0.02 for h in (0, 1, 3, 4, 5, 6, 7)},
                   noisy_nodes={"L3H5": {"pr": -1.3, "noise": 6.0}}),
    "graded": dict(PLANTED, erasers={"L2H6": -0.9, "L2H1": -0.5, "L2H4": -0.2}),  # not in label order: ties cannot pass
    "null": None,
}


def demo_corpus(n_rows: int = 64, seq_len: int = 1024, d_vocab: int = GELU_4L_SHAPE["d_vocab"], seed: int = 0):
    """Deterministic synthetic token rows [n_rows, seq_len] (Zipf-distributed ids, like text)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.3, size=(n_rows, seq_len)) - 1
    perm = rng.permutation(d_vocab)  # frequent ids spread over the vocabulary
    return perm[np.minimum(ranks, d_vocab - 1)].astype(np.int32)


def _label(label: str) -> tuple:
    layer, head = (int(x) for x in label[1:].split("H"))
    return layer, head


def _writer_outputs(model, tokens, writer: tuple, writer_W_O: torch.Tensor, nodes: list):
    """From TransformerLens's own cache (not this package's attribution code): the writer's output
    r_w [B, P, D] and the hook_z [B, P, d_head] of each (layer, head) in ``nodes``, in float64."""
    wl, wh = writer
    names = {f"blocks.{wl}.attn.hook_z"} | {f"blocks.{l}.attn.hook_z" for l, _ in nodes}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    r_w = cache[f"blocks.{wl}.attn.hook_z"][:, :, wh].double() @ writer_W_O.double()
    return r_w, {(l, h): cache[f"blocks.{l}.attn.hook_z"][:, :, h].double() for l, h in nodes}


def calibrate_eraser_gains(model, tokens: torch.Tensor, writer: tuple, erasers: list, u: torch.Tensor,
                           writer_W_O: torch.Tensor, targets: dict) -> dict:
    """Gain per eraser that puts its median projection ratio onto the writer at its target, in
    closed form from TransformerLens's own activations (not from this package's attribution code).

    An eraser (zero QK, W_V reading u into its first value coordinate, W_O = -u in that row) outputs
    r_e(t) = -g z_e(t)[0] u, where z_e is its hook_z; the writer outputs r_w(t) = z_w(t) W_O[w]. So
    PR_e(t) = r_e.r_w / |r_w|^2 = -g z_e(t)[0] (u . r_w(t)) / |r_w(t)|^2, linear in g; with the erasers
    at g = 1 (they only write after the writer's layer, so r_w does not depend on g) the median of
    PR at g = 1 over ``tokens`` [batch, pos] fixes g = target / median."""
    r_w, z = _writer_outputs(model, tokens, writer, writer_W_O, [(el, eh) for _, el, eh in erasers])
    along_u = r_w @ u.double()
    sq_norm = (r_w * r_w).sum(-1)
    gains = {}
    for label, el, eh in erasers:
        pr_at_one = -z[(el, eh)][..., 0] * along_u / sq_norm
        gains[label] = targets[label] / float(pr_at_one.reshape(-1).median())
    return gains


def calibrate_noisy_gains(model, tokens: torch.Tensor, writer: tuple, noisy: list, u: torch.Tensor,
                          writer_W_O: torch.Tensor, node_W_O: dict, targets: dict) -> dict:
    """Gain k per noisy node whose median PR onto the writer is its target. The node's first value
    coordinate is the constant 1 (value bias 1, nothing read), so its output is -k u + n(t) with n(t)
    its large random part: PR(t) = A(t) - k B(t), A = n.r_w / |r_w|^2, B = u.r_w / |r_w|^2 > 0. The
    median is monotone in k, so bisection on TransformerLens's activations finds it."""
    r_w, z = _writer_outputs(model, tokens, writer, writer_W_O, [(l, h) for _, l, h in noisy])
    sq_norm = (r_w * r_w).sum(-1)
    B = (r_w @ u.double()) / sq_norm
    gains = {}
    for label, l, h in noisy:
        noise = z[(l, h)] @ node_W_O[label].double()  # the node's output with k = 0
        A = (noise * r_w).sum(-1) / sq_norm

        def median_pr(k):
            return float((A - k * B).reshape(-1).median())

        lo, hi = 0.0, 1.0
        while median_pr(hi) > targets[label]:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if median_pr(mid) > targets[label] else (lo, mid)
        gains[label] = hi
    return gains


def random_model(seed: int = 0, dims: dict = None):
    """A GELU-4L-shaped model (or ``dims``) with random weights and nothing planted: the null model
    of the ranking tests. Same initialisation as `planted_model` (MLP outputs scaled by 0.1)."""
    dims = dict(dims or GELU_4L_SHAPE)
    sd = random_tl_state_dict(dims, seed)
    for l in range(dims["n_layers"]):
        sd[f"blocks.{l}.mlp.W_out"] *= 0.1
    return model_from_state_dict(dims, sd, name="random-gelu4l")


def planted_model(seed: int = 0, dims: dict = None, planted: dict = None, processing: str = "raw"):
    """GELU-4L-shaped bridge with a planted erasure circuit (`planted_weights`); returns (model,
    description). ``processing="from_pretrained"`` processes the planted weights as TransformerLens's
    ``from_pretrained`` would (`erasure_fast.tl_models.from_pretrained_processing`), as the paper's
    authors loaded GELU-4L: the same model, with the writer's and erasers' outputs centred."""
    from .tl_models import check_processing

    check_processing(processing)
    dims = dict(dims or GELU_4L_SHAPE)
    sd, info = planted_weights(seed, dims, planted)
    return model_from_state_dict(dims, sd, name="demo-planted-gelu4l", processing=processing), info


def planted_weights(seed: int = 0, dims: dict = None, planted: dict = None):
    """The raw weights (HookedTransformer naming) of `planted_model` and its description: (state dict,
    info). The circuit is planted and calibrated in these weights.

    On top of random weights (`random_tl_state_dict`, MLP output weights scaled by 0.1 so that MLPs
    do not dwarf the heads as they do at random initialisation):
    - writer L0H2 attends to the BOS position (query bias times a key that reads the BOS token's
      normalised embedding) and writes along one unit direction u with norm ``writer_norm`` (rank-1
      W_O) -- like the paper's L0H2, whose output comes mostly from BOS;
    - erasers L2H3 and L2H6 attend uniformly (zero QK), read the residual stream along u and write
      -a u (rank-1 OV). Each gain a is calibrated on a fixed 2 x n_ctx batch so that the eraser's median
      projection ratio onto L0H2 is the planted target (`calibrate_eraser_gains`: closed form from
      TransformerLens's activations, independent of the attribution code). u is orthogonal to what
      the writer's layer-mates write, so the erasers' output does not masquerade as erasing them.
    Everything else stays random, so a scan should rank these pairs first.

    Optional keys of ``planted`` build the ranking tests' decoys:
    - ``quiet_heads`` {label: scale}: those heads' W_O scaled down -- small-norm writers, along which
      a big eraser of another writer has a large projection ratio by accident;
    - ``noisy_nodes`` {label: {"pr": target, "noise": gain}}: a later head whose output is a large
      random part (W_O scaled by ``noise``) plus a constant component -k u along the writer's
      direction, k calibrated so that its median PR onto the writer is ``pr`` (`calibrate_noisy_gains`).
    """
    dims = dict(dims or GELU_4L_SHAPE)
    planted = dict(planted or PLANTED)
    sd = random_tl_state_dict(dims, seed)
    g = torch.Generator().manual_seed(seed + 12345)
    D = dims["d_model"]
    for l in range(dims["n_layers"]):
        sd[f"blocks.{l}.mlp.W_out"] *= 0.1
    bos = planted["bos"]
    x0 = sd["embed.W_E"][bos] + sd["pos_embed.W_pos"][0]
    c0 = x0 - x0.mean()
    n0 = c0 / (c0.pow(2).mean() + 1e-5).sqrt()  # ln1 of the BOS position (LN weight 1, bias 0)
    wl, wh = (int(x) for x in planted["writer"][1:].split("H"))
    # u: a random direction that no other head of the writer's layer writes to (when d_model allows)
    u = torch.randn(D, generator=g)
    others = torch.cat([sd[f"blocks.{wl}.attn.W_O"][h] for h in range(dims["n_heads"]) if h != wh])  # [rows, D]
    if others.shape[0] < D:
        q, _ = torch.linalg.qr(others.T)
        u -= q @ (q.T @ u)
    u /= u.norm()
    p = f"blocks.{wl}.attn."
    sd[p + "W_Q"][wh] = 0
    sd[p + "b_Q"][wh] = 0
    sd[p + "b_Q"][wh][0] = 12.0
    sd[p + "W_K"][wh] = 0
    sd[p + "W_K"][wh][:, 0] = n0 / n0.norm()
    v = n0 @ sd[p + "W_V"][wh]  # the value the writer reads at BOS
    sd[p + "W_O"][wh] = torch.outer(v / v.norm() ** 2, u) * planted["writer_norm"]
    for label, scale in planted.get("quiet_heads", {}).items():
        ql, qh = _label(label)
        sd[f"blocks.{ql}.attn.W_O"][qh] *= scale
    noisy, noisy_W_O = [], {}
    for label, spec in planted.get("noisy_nodes", {}).items():
        nl, nh = _label(label)
        q = f"blocks.{nl}.attn."
        sd[q + "W_V"][nh][:, 0] = 0
        sd[q + "b_V"][nh] = 0
        sd[q + "b_V"][nh][0] = 1.0  # first value coordinate: the constant 1
        sd[q + "W_O"][nh] *= spec["noise"]
        sd[q + "W_O"][nh][0] = 0
        noisy_W_O[label] = sd[q + "W_O"][nh].clone()
        noisy.append((label, nl, nh))
    erasers = []
    for label in planted["erasers"]:
        el, eh = (int(x) for x in label[1:].split("H"))
        q = f"blocks.{el}.attn."
        for k in ("W_Q", "W_K", "W_V", "W_O"):
            sd[q + k][eh] = 0
        sd[q + "b_V"][eh] = 0
        sd[q + "W_V"][eh][:, 0] = u
        sd[q + "W_O"][eh][0] = -u
        erasers.append((label, el, eh))
    model = model_from_state_dict(dims, sd, name="demo-planted-gelu4l")
    calib = torch.from_numpy(demo_corpus(2, dims["n_ctx"], dims["d_vocab"], seed=seed + 1)).long()
    calib[:, 0] = bos
    gains = calibrate_eraser_gains(model, calib, (wl, wh), erasers, u, sd[p + "W_O"][wh], planted["erasers"])
    for label, el, eh in erasers:
        sd[f"blocks.{el}.attn.W_O"][eh] *= gains[label]
    if noisy:
        targets = {label: spec["pr"] for label, spec in planted["noisy_nodes"].items()}
        noisy_gains = calibrate_noisy_gains(model, calib, (wl, wh), noisy, u, sd[p + "W_O"][wh], noisy_W_O, targets)
        for label, nl, nh in noisy:
            sd[f"blocks.{nl}.attn.W_O"][nh][0] = -noisy_gains[label] * u
        gains.update(noisy_gains)
    info = dict(planted, gains=gains, seed=seed, note=(
        f"Synthetic model: GELU-4L shape, random weights (seed {seed}), planted erasure circuit: writer "
        f"{planted['writer']} (attends to BOS, token id {bos}), erasers "
        + ", ".join(f"{k} (target median PR {v})" for k, v in planted["erasers"].items())
        + f", gains calibrated on a fixed 2x{dims['n_ctx']} batch. Real GELU-4L weights were not available."))
    return sd, info
