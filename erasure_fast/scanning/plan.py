"""Stage 1 of a scan: check the whole job before any work and fix its configuration.

`ScanOptions` is every option of a scan, each with its default, checked by itself when made (numbers
and flags by kind, the ranking statistic, the position buckets). `plan_scan` validates them against
the job -- the output folder (writable, holding no file a scan did not write there unless
``overwrite``; outdir.py), the model (and hooks attached to it), the corpus (it exists, is readable,
has at least one row, every id of an array corpus lies in the vocabulary, it is not where the scan
writes), seq_len against the model's context, the BOS id, the writers (each head once), the backend --
and returns a `ScanPlan`. Nothing is run and nothing is
created before that.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import FrozenSet, List, Optional, Sequence, Union

import numpy as np
import torch

from ..attribution import resolve_capture, resolve_writers
from ..backends import get_backend
from ..backends.base import Backend
from ..capture import model_device
from ..capture_modes import CaptureChoice, CaptureMode
from ..models import ModelSpec, as_transformer_lens, model_spec
from ..optional_deps import import_optional, require_optional
from .corpus import TokenCorpus, open_corpus
from .outdir import check_corpus_outside, check_scan_dir
from .aggregate import centred_bins
from .ranking import DEFAULT_RANK, RANK_STATISTICS

PR_LO, PR_HI, PR_BINS = centred_bins(3.0, 0.005)  # projection ratios: 0.005-wide bins over [-3.0025, 3.0025)
DLA_LO, DLA_HI, DLA_BINS = centred_bins(10.0, 0.01)  # logits: 0.01-wide bins over [-10.005, 10.005)
PR_RANGE, DLA_RANGE = (PR_LO, PR_HI), (DLA_LO, DLA_HI)
POSITION_EDGES = (1, 16, 128)  # buckets [0] (BOS), [1, 16), [16, 128), [128, n_ctx)
# Each top example keeps the ids of the tokens around its position as the model read them: this many
# before it, the position itself, and the rest after it (its next-token target first).
CONTEXT_BEFORE, CONTEXT = 24, 32


@dataclass
class ScanConfig:
    """What determines a scan's aggregates; a checkpoint resumes only under the same config."""

    writers: List[int]
    writer_labels: List[str]
    node_labels: List[str]
    resid_labels: List[str]
    head_labels: List[str]
    n_heads: int  # per layer (node i < n_layers * n_heads is head i, layer i // n_heads)
    parallel_blocks: bool  # attention and MLP read the same stream (models.is_downstream)
    seq_len: int
    batch_size: int
    prepend_bos: Optional[int]
    position_edges: List[int]
    top_k: int
    backend: str
    model_fingerprint: str
    corpus: dict
    null_seed: int = 0  # seeds the null reference's random directions (pair_stats.null_directions)

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=list))

    def resume_fields(self) -> dict:
        """What a checkpoint must match to be resumed: every field but the corpus's description (its
        path, size, length...), since what matters of the corpus is the tokens already read, which a
        resumed scan re-reads and compares (`ScanJob`): a corpus that grew, was moved or was fixed
        after the part already scanned resumes."""
        return {k: v for k, v in self.as_json().items() if k != "corpus"}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.resume_fields(), sort_keys=True).encode()).hexdigest()[:20]

    def differences(self, other: dict) -> List[str]:
        """What differs from ``other`` (a checkpoint's saved config), one "field (checkpoint: ..., now:
        ...)" each."""
        def short(value) -> str:
            text = json.dumps(value)
            return text if len(text) <= 60 else text[:57] + "..."

        return [f"{k} (checkpoint: {short(other.get(k))}, now: {short(v)})"
                for k, v in self.resume_fields().items() if other.get(k) != v]


@dataclass
class ScanPlan:
    """A validated scan: everything `ScanJob` needs, nothing run yet."""

    model: object
    spec: ModelSpec
    corpus: TokenCorpus
    cfg: ScanConfig
    impl: Backend  # the resolved backend (erasure_fast.backends.base.Backend)
    device: torch.device
    wr: torch.Tensor  # [W] writer head indices
    out_dir: str
    resume: bool
    max_rows: Optional[int]
    checkpoint_every: int
    progress: bool
    report: bool
    notes: Optional[str]
    owned_files: FrozenSet[str] = frozenset()  # the files the output folder's manifest lists (outdir.py)
    rank_by: str = "es"  # the report's ranking statistic (ranking.py); not part of the config
    capture: CaptureChoice = CaptureChoice(CaptureMode.HOOKS)  # `resolve_capture`'s answer; not part of the config
    tokenizer: object = None  # decodes the report's token contexts (the model's own by default); may be None


def model_fingerprint(model) -> str:
    """Hash of every parameter's bytes (and names, dtypes), so a changed model refuses to resume.
    xxh3-128, not a cryptographic hash: it guards against accidents (other weights, a fine-tuned
    copy), not forgery, and reads ~30 GB/s where sha256 read 2 GB/s (0.1 s of a 64K-token scan)."""
    h = require_optional("xxhash", "scan", "a scan's model fingerprint").xxh3_128()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(str(p.dtype).encode())
            t = p.detach().cpu().contiguous()
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes themselves, no copy
    return h.hexdigest()[:20]


def _positive_int(name: str, value, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


# Bytes per kept example of the top-k tables: score, row, position, three payload values and the
# context's ids (8 bytes each), two tables, and the candidates each update concatenates beside them.
_TOPK_BYTES = 8 * (6 + CONTEXT) * 2 * 2


def _available_memory() -> Optional[int]:
    """Bytes of memory available to new allocations: psutil's figure where it is installed, else
    Linux's MemAvailable; None where neither says (the check is then skipped)."""
    psutil = import_optional("psutil")
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_top_k_fits(top_k: int, n_writers: int) -> None:
    """Refuse a top_k whose example tables alone would not fit in this machine's free memory."""
    need = _TOPK_BYTES * top_k * n_writers
    free = _available_memory()
    if free is not None and need > free // 2:
        fits = max(1, free // 2 // (_TOPK_BYTES * n_writers))
        raise ValueError(f"top_k {top_k:,} keeps {top_k * n_writers:,} example positions ({need / 2**30:,.1f} GiB for "
                         f"{n_writers} writer(s)), more than half of this machine's free memory "
                         f"({free / 2**30:,.1f} GiB); at most {fits:,} fit")


@dataclass(frozen=True)
class ScanOptions:
    """Every option of a scan, with its default: the keywords `erasure_fast.scan` and `plan_scan` take
    (``scan(model, corpus, top_k=50)`` is ``ScanOptions(top_k=50)``), and what the command line builds
    from its flags. Each option is checked by itself here, when the options are made (TypeError /
    ValueError naming it); `plan_scan` then checks them against the model, the corpus and the output
    folder. ``~`` and ``$VARS`` are expanded in every path option."""

    writers: object = "all"
    """``"all"`` or heads (index, (layer, head) or "L0H2"), each at most once."""
    seq_len: Optional[int] = None
    """Row length (needed for 1-D streams; defaults to a 2-D array's row length, else 1024). Stored rows
    longer than seq_len are cut into several windows."""
    batch_size: int = 8
    """Rows per forward pass."""
    out_dir: object = "scan_out"
    """Where checkpoints and the report go; locked while the scan runs. A folder holding files no scan
    wrote there is refused (see ``overwrite``)."""
    resume: bool = True
    """Continue from ``out_dir``'s checkpoint when its configuration matches and the corpus part it
    aggregated is unchanged (a corpus that grew, moved or changed after that part resumes; a smaller
    ``max_tokens`` reports the checkpoint's larger scan, with a warning); False starts afresh (removing
    the files a previous scan wrote there)."""
    backend: str = "auto"
    """``"auto"``, "torch", "cpp" or "triton"."""
    max_tokens: Optional[int] = None
    """Stop after this many tokens (whole rows)."""
    prepend_bos: Optional[int] = None
    """A token id to put at position 0 of every row (the row keeps seq_len tokens)."""
    checkpoint_every: int = 20
    """Batches between checkpoints."""
    top_k: int = 20
    """Example positions kept for every writer, of each kind (strongest erasure; |DLA| - |adjusted DLA|),
    each with the ids of the tokens around it (summary.json, report.html, report.md)."""
    position_edges: Sequence[int] = POSITION_EDGES
    """Position buckets for the BOS split (default: 0 | 1-15 | 16-127 | 128+); increasing ints >= 1."""
    progress: bool = True
    """A progress bar (rank 0)."""
    report: bool = True
    """Write summary.parquet / .csv / .json, report.md, report.html and plots into ``out_dir``."""
    tokenizer: object = None
    """Tokenises text corpora and decodes the report's token contexts (default: the model's own;
    without one the report shows token ids)."""
    notes: Optional[str] = None
    """A line for the top of the report (e.g. that the model is synthetic)."""
    bin_dtype: Optional[str] = None
    """The dtype of a raw ``.bin`` corpus (uint16, uint32, int32, int64); required for .bin."""
    column: Optional[str] = None
    """The token column of a Hugging Face dataset (default "tokens"; only for datasets)."""
    rank_by: str = DEFAULT_RANK
    """The report's ranking statistic: "es" (erasure score PR * |cos| * |w| / |x|, the default), "apr",
    "pr", "pv" or "cos" (`erasure_fast.scanning.ranking`); the report can be re-ranked by running the
    finished scan again with another value (nothing is recomputed)."""
    capture: Union[str, CaptureMode] = "auto"
    """``"auto"`` (the capture engine where it covers the model, else TransformerLens hooks), "engine" or
    "hooks" (`erasure_fast.engine`); the report records which was used and why. Not part of the
    configuration: a scan may resume under the other (same numbers to rounding). A model with hooks
    attached (TransformerLens hook points, torch forward hooks) is run through them ("hooks"), or
    refused where it cannot be (`erasure_fast.models.hooks`)."""
    overwrite: bool = False
    """Scan into ``out_dir`` although it holds files no scan wrote there. The scan still writes only its
    own file names (replacing files of those names) and removes only files a scan wrote (listed in the
    folder's manifest); the corpus is never written or removed."""

    def __post_init__(self):
        if self.rank_by not in RANK_STATISTICS:
            raise ValueError(f"rank_by must be one of {', '.join(RANK_STATISTICS)}, got {self.rank_by!r}")
        checked = {name: _positive_int(name, getattr(self, name)) for name in ("batch_size", "checkpoint_every", "top_k")}
        checked["max_tokens"] = _positive_int("max_tokens", self.max_tokens, allow_none=True)
        checked.update((name, _flag(name, getattr(self, name))) for name in ("resume", "progress", "report", "overwrite"))
        if self.notes is not None and not isinstance(self.notes, str):
            raise TypeError(f"notes must be a str or None, got {type(self.notes).__name__}")
        checked["position_edges"] = _position_edges(self.position_edges)
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # the checked value (an int for a numpy int, edges as a tuple)

    @classmethod
    def from_keywords(cls, caller: str, keywords: dict, base: Optional["ScanOptions"] = None) -> "ScanOptions":
        """The options ``caller(model, corpus, **keywords)`` names (over ``base``'s, if given); a name
        that is not an option is a TypeError naming it, as Python's own for a mistyped keyword."""
        names = [f.name for f in fields(cls)]
        for key in keywords:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}{hint}")
        return replace(base, **keywords) if base is not None else cls(**keywords)


def _position_edges(position_edges) -> tuple:
    try:
        edges = list(position_edges)
    except TypeError:
        edges = None
    if not edges or any(isinstance(e, bool) or not isinstance(e, numbers.Integral) or e < 1 for e in edges) \
            or edges != sorted(set(edges)):
        raise ValueError(f"position_edges must be increasing ints >= 1, got {position_edges!r}")
    return tuple(int(e) for e in edges)


def keyword_signature(fn):
    """Give ``fn(model, corpus, **options)`` (a decorator) the signature naming every option with its default (what
    ``help`` and ``inspect.signature`` show), from `ScanOptions`."""
    head = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(ScanOptions)]
    fn.__signature__ = inspect.signature(fn).replace(parameters=head + options)
    return fn


@keyword_signature
def plan_scan(model, corpus, options: Optional[ScanOptions] = None, **keywords) -> ScanPlan:
    """Validate a scan and return its `ScanPlan`: the options as a `ScanOptions`, or as keywords (those
    of `erasure_fast.scan`; with ``options`` too, they replace its values). Raises ValueError /
    TypeError (CorpusError and OutputDirError are ValueErrors) naming the argument."""
    if options is not None and not isinstance(options, ScanOptions):
        raise TypeError(f"options must be a ScanOptions, got {type(options).__name__} (pass the options as keywords)")
    o = ScanOptions.from_keywords("plan_scan", keywords, base=options) if keywords or options is None else options
    model = as_transformer_lens(model)
    spec = model_spec(model)  # an unsupported model is refused before the output folder is touched
    out_dir, owned = check_scan_dir(o.out_dir, overwrite=o.overwrite, create=False)  # made by the job, under its lock
    tokenizer = o.tokenizer if o.tokenizer is not None else getattr(model, "tokenizer", None)
    corpus = open_corpus(corpus, seq_len=o.seq_len, tokenizer=tokenizer, bin_dtype=o.bin_dtype, column=o.column)
    check_corpus_outside(out_dir, corpus.source)
    if spec.n_ctx is not None and corpus.seq_len > spec.n_ctx:
        raise ValueError(f"seq_len {corpus.seq_len} exceeds the model's n_ctx {spec.n_ctx}")
    prepend_bos = o.prepend_bos
    if prepend_bos is not None:
        if isinstance(prepend_bos, (bool, np.bool_)) or not isinstance(prepend_bos, numbers.Integral) \
                or not 0 <= prepend_bos < spec.d_vocab:
            raise ValueError(f"prepend_bos must be a token id in [0, {spec.d_vocab}), got {prepend_bos!r}")
        prepend_bos = int(prepend_bos)
    wr = resolve_writers(o.writers, spec)
    _check_top_k_fits(o.top_k, len(wr))
    capture_mode = resolve_capture(o.capture, model, spec)
    dev = model_device(model)
    impl = get_backend(o.backend, dev, spec.W_O.dtype)
    max_rows = None if o.max_tokens is None else max(1, o.max_tokens // corpus.seq_len)
    corpus.check_ids(spec.d_vocab, max_rows)  # array corpora: every id, before the first batch
    L = spec.n_layers
    cfg = ScanConfig(
        writers=wr.tolist(), writer_labels=[spec.head_label(int(w)) for w in wr],
        node_labels=spec.head_labels() + ([f"MLP{l}" for l in range(L)] if spec.has_mlps else []),
        resid_labels=spec.resid_labels(),
        head_labels=spec.head_labels(), n_heads=spec.n_heads, parallel_blocks=spec.parallel_blocks,
        seq_len=corpus.seq_len, batch_size=o.batch_size, prepend_bos=prepend_bos,
        position_edges=list(o.position_edges), top_k=o.top_k, backend=impl.NAME,
        model_fingerprint=model_fingerprint(model), corpus=corpus.describe(),
    )
    return ScanPlan(model=model, spec=spec, corpus=corpus, cfg=cfg, impl=impl, device=dev, wr=wr, out_dir=out_dir,
                    resume=o.resume, max_rows=max_rows, checkpoint_every=o.checkpoint_every, progress=o.progress,
                    report=o.report, notes=o.notes, owned_files=owned, rank_by=o.rank_by, capture=capture_mode,
                    tokenizer=tokenizer)

