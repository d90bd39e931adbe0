"""`erasure-fast paper`: every analysis of the paper on one model -> tables, PNGs and a markdown report.

`add_arguments` defines the command's options; `run` executes them in two steps. `plan_job` turns the
arguments into a `PaperJob` and checks everything the requested analyses need -- the heads, the
lengths, the output folder, the device, the corpus and, for the miner, the scan -- before the first
forward pass or file write, so a user error never costs finished work. Each user error is a
ValueError or TypeError (ModelLoadError and CorpusError are ValueErrors) with a one-line message that
starts with the flag at fault ("--corpus: ..."); the main CLI prints that line and exits 2.
`run_job` then runs the analyses and writes the report; a failure there is a bug and is raised as is.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..attribution import resolve_capture
from ..capture import model_device
from ..demo import PLANTED, demo_corpus, planted_model
from ..capture_modes import CaptureChoice, CaptureMode
from ..engine import CAPTURE_MODES
from ..loading import GELU_4L_REPO, ModelLoadError, check_device, load_model, locate_model
from ..models import UnsupportedModelError, model_spec
from ..errors import blame
from ..paths import check_output_dir
from ..scanning import CorpusError, open_corpus
from ..scanning.corpus import HUB_PREFIX
from ..tl_models import PROCESSING, PROCESSING_WORDS
from .bos_split import bos_split
from .causal import causal_check
from .common import DEFAULT_ERASERS, FIG4B_HEADS, eraser_layer, head_indices
from .support import paper_support_problem
from .miner import check_scan_model, mine_adversarial, open_scanned_corpus, read_scan_summary, scan_candidate_rows
from .resample import paper_prompts, paper_prompts_unavailable, plot_resample_ablation, resample_ablation
from .residual import fig1_fig2
from .stats import CONVENTION
from .v_composition import PAPER_START_POS, v_composition
from ..webpage import markdown_page, write_page

ANALYSES = ("all", "fig1", "fig2", "fig3", "fig4", "fig5", "fig8", "mine")
FIGURES = ("fig1", "fig2", "fig3", "fig4", "fig5", "fig8")  # what "all" runs: the miner needs a scan
USES_ERASERS = {"fig3", "fig5", "fig8", "mine"}
NEEDS_ERASER_LAYER = {"fig3", "fig5", "mine"}  # they patch or read the erasers' (single) layer's value input
DEMO_CORPUS = "demo"
DEMO_SCAN_ROWS = 64  # `erasure-fast demo` scans demo_corpus(64, seq_len)
MINE_TOP = 10  # candidates the miner shows (mine_adversarial's default)
WEIGHTS = ("auto",) + PROCESSING
# What the paper reports for GELU-4L (writer L0H2, erasers L2H2-L2H7, weights as from_pretrained loads
# them): (figure, quantity, value, this run's number's key in `run_job`'s results).
PUBLISHED = [
    ("Fig. 1", "median PR of resid_mid0 onto L0H2", 0.96, ("resid", "resid_mid0")),
    ("Fig. 1", "median PR of resid_post1 onto L0H2", 1.02, ("resid", "resid_post1")),
    ("Fig. 1", "median PR of resid_mid2 onto L0H2", 0.10, ("resid", "resid_mid2")),
    ("Fig. 1", "median PR of resid_post3 onto L0H2", 0.055, ("resid", "resid_post3")),
] + [("Fig. 2", f"median PR of {h} onto L0H2", v, ("node", h))
     for h, v in zip(DEFAULT_ERASERS, (-0.145, -0.035, -0.12, -0.26, -0.175, -0.14))] + [
    ("Fig. 3", "median PR of resid_post3 onto L0H2, patched", 0.48, ("fig3", "resid_post3")),
    ("Fig. 5", "slope of the fit (± 2 standard errors)", (-0.723, 0.013), ("fig5", "slope")),
]
AUTHORS_SIZES = ("300 corpus rows of 1024 tokens (240 C4, 60 code) for figs 1-3 and 8, and as fig 4's donors; "
                 "the first 10 of them for fig 5, positions 32-1022")
FIG5_ROWS = 10  # fig 5 fits the first 10 rows of the batch, as the authors do


def add_arguments(parser):
    """Define the options of `erasure-fast paper` on ``parser`` (its help is meant for
    argparse.ArgumentDefaultsHelpFormatter, which shows each default). Returns ``parser``."""
    parser.add_argument("analysis", nargs="?", default="all", choices=ANALYSES,
                        help="one analysis, or 'all': every figure (fig1-fig5, fig8) but not the miner, which needs a scan")
    parser.add_argument("--scan-dir", default=None,
                        help="for 'mine' (required there): the output directory of an `erasure-fast scan` or "
                             "`erasure-fast demo` run (it holds summary.json)")
    parser.add_argument("--model", default="auto",
                        help="auto (gelu-4l when cached, else demo), demo (planted GELU-4L-shaped model), gelu-4l "
                             "(local Hugging Face cache), a cached owner/name repo, or a checkpoint directory (TransformerLens-style, "
                             "or a Hugging Face checkpoint of any family TransformerLens 4 bridges)")
    parser.add_argument("--corpus", default=None,
                        help="token corpus: a .npy / .bin token file, .txt / .jsonl text (needs the model's tokenizer), "
                             "a Hugging Face save_to_disk directory or hf:owner/name; 'demo' = the synthetic demo corpus "
                             "(for 'mine': the one `erasure-fast demo` scans). Not given: the figures use the synthetic demo corpus, and "
                             "'mine' the corpus its scan read")
    parser.add_argument("--bin-dtype", default=None, choices=["uint16", "uint32", "int32", "int64"],
                        help="dtype of a raw .bin --corpus (it has no header); 'mine' defaults to the dtype its scan recorded")
    parser.add_argument("--out", default="paper_out",
                        help="output directory for the tables, figures and report (created if needed; not a file)")
    parser.add_argument("--writer", default="L0H2",
                        help="the writer head, e.g. L0H2; for 'mine' it must be the scan's focus writer")
    parser.add_argument("--erasers", default=None,
                        help="comma-separated eraser heads, all in one layer after the writer's, e.g. L2H3,L2H6. "
                             "Not given: the planted erasers on the demo model, else the paper's L2H2-L2H7")
    parser.add_argument("--weights", default="auto", choices=list(WEIGHTS),
                        help="how gelu-4l, the demo model or a TransformerLens-style checkpoint is loaded: from_pretrained = "
                             "processed as TransformerLens's HookedTransformer.from_pretrained does by default (fold_ln, "
                             "center_writing_weights, center_unembed, fold_value_biases), as the paper's authors loaded GELU-4L; "
                             "raw = as stored; auto = from_pretrained for the figures, raw for 'mine' (a scan reads raw "
                             "weights) and for Hugging Face checkpoints (bridged as stored)")
    parser.add_argument("--rows", type=int, default=4,
                        help="corpus rows in the figures' batch (>= 1; the authors used 300 rows of 1024 tokens); fig 5 "
                             f"takes the first {FIG5_ROWS} of them, as the authors do")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="tokens per row for the figures (from 2 to the model's n_ctx); 'mine' uses the scan's rows")
    parser.add_argument("--samples", type=int, default=10,
                        help="fig 4's donors per prompt: the first SAMPLES corpus rows (>= 1; the authors used 300)")
    parser.add_argument("--prepend-bos", type=int, default=None, metavar="ID",
                        help="token ID put at position 0 of every row, the row shifted right as the scan does. Not "
                             "given: the planted BOS (0) on the synthetic demo corpus, nothing on other corpora; "
                             "'mine' always uses the scan's")
    parser.add_argument("--device", default=None, help="torch device for the model, e.g. cuda or cpu; not given: cpu")
    parser.add_argument("--capture", default="auto", choices=list(CAPTURE_MODES),
                        help="how the runs without interventions (figs 1/2, fig 4's clean and donor runs, fig 8's full "
                             "run) capture activations: the engine (the forward recomputed from the weights), "
                             "TransformerLens hooks, or auto (the engine where it covers the model); runs with "
                             "interventions or kept activations (figs 3, 5, the miner's recheck) use hooks")
    return parser


@dataclass
class PaperJob:
    """A checked `erasure-fast paper` run: the loaded model and everything each analysis reads."""

    analyses: List[str]
    report_name: str
    out: str
    opened: PaperModel  # the model and what the report says about it
    writer: str
    erasers: List[str]
    samples: int
    capture: str = "auto"  # the --capture option
    capture_used: CaptureChoice = CaptureChoice(CaptureMode.HOOKS)  # what it resolved to on this model (and why)
    corpus_label: Optional[str] = None  # the figures' corpus, in words
    batch: Optional[torch.Tensor] = None  # the figures' token batch [rows, seq_len]
    donor_rows: Optional[np.ndarray] = None  # fig 4: its donors, the first --samples rows (BOS as in the batch)
    prompts: Optional[list] = None  # fig 4: the paper's prompts, when the model can run them
    prompts_unavailable: Optional[str] = None  # ... and why not, when it cannot
    scan_dir: Optional[str] = None  # mine
    scan_corpus: object = None  # mine: the opened corpus the scan read
    scan_corpus_label: Optional[str] = None
    not_run: Optional[dict] = None  # 'all': {analysis: why the model cannot run it}, left out of the job

    @property
    def model(self):
        return self.opened.model


def run(args) -> int:
    """`erasure-fast paper` with parsed ``args`` (see `add_arguments`): check the whole job, then run it."""
    return run_job(plan_job(args))


# ---------------------------------------------------------------------------------------------------
# Checking the job (no forward pass, no file written)


def _int_option(value, flag: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{flag}: expected an integer, got {value!r}")
    if value < least:
        raise ValueError(f"{flag}: must be >= {least}, got {value}")
    return int(value)


def _check_out(out) -> str:
    """``out`` as a directory that exists or can be created (nothing is created yet)."""
    return check_output_dir(out, "--out", create=False)


def _head_label(text, flag: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise TypeError(f"{flag}: expected a head label like L0H2, got {text!r}")
    return text.strip().upper()


def paper_weights(weights: str, kind: str, analysis: str) -> str:
    """The processing --weights (one of `WEIGHTS`) means for a model of ``kind``
    (`erasure_fast.loading.locate_model`) running ``analysis``: 'auto' is from_pretrained, except raw for
    'mine' and for Hugging Face checkpoints."""
    if weights == "auto":
        return "raw" if kind == "hf" or analysis == "mine" else "from_pretrained"
    return weights


@dataclass
class PaperModel:
    """The model `open_paper_model` opened for --model, and what the report says about it."""

    model: object
    label: str
    default_erasers: List[str]
    note: Optional[str]  # the planted model's description
    weights: str  # the processing it was loaded with (a key of PROCESSING_WORDS)
    gelu_4l: bool  # the real GELU-4L: the report compares with the paper's numbers
    gelu_4l_missing: bool = False  # 'auto' found no GELU-4L in the local cache and fell back to the demo model


def open_paper_model(name: str, device=None, weights: str = "auto", analysis: str = "all") -> PaperModel:
    """The `PaperModel` for --model: 'auto' = the real GELU-4L when cached, else the planted demo model;
    'demo'; 'gelu-4l'; or anything `erasure_fast.load_model` takes; loaded as --weights says (`paper_weights`)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"--model: expected a model name or directory, got {name!r}")
    with blame("--model"):
        if name in ("auto", "gelu-4l"):
            try:
                processing = paper_weights(weights, "tl", analysis)
                model = load_model("gelu-4l", device=device, processing=processing)
                return PaperModel(model, f"gelu-4l ({GELU_4L_REPO}, local cache)", list(DEFAULT_ERASERS), None,
                                  processing, gelu_4l=True)
            except ModelLoadError as e:
                if name == "gelu-4l":
                    raise
                print(f"GELU-4L is not cached here ({str(e).splitlines()[0][:80]}...); running on the planted demo model")
        if name in ("auto", "demo"):
            processing = paper_weights(weights, "demo", analysis)
            model, info = planted_model(processing=processing)
            model = model.to(device) if device else model
            return PaperModel(model, "demo (planted GELU-4L-shaped model)", list(PLANTED["erasers"]), info["note"],
                              processing, gelu_4l=False, gelu_4l_missing=name == "auto")
        kind, _, repo = locate_model(name)
        processing = paper_weights(weights, kind, analysis)
        return PaperModel(load_model(name, device=device, processing=processing), name, list(DEFAULT_ERASERS), None,
                          processing, gelu_4l=repo == GELU_4L_REPO)


def _check_ids(rows: np.ndarray, d_vocab: int, source: str) -> None:
    bad = np.nonzero(((rows < 0) | (rows >= d_vocab)).any(axis=1))[0]
    if len(bad):
        raise CorpusError(f"{source}: row {int(bad[0])} has token ids outside the model's vocabulary [0, {d_vocab})")


def _figure_rows(corpus, model, n_rows: int, seq_len: int, bin_dtype: Optional[str]):
    """(token rows [n_rows, seq_len], words for the report): the synthetic demo corpus when ``corpus`` is
    None or 'demo', else the first rows of the corpus file or dataset."""
    spec = model_spec(model)
    if corpus is None or corpus == DEMO_CORPUS:
        label = "the synthetic demo corpus (Zipf-distributed token ids" + (", --corpus not given)" if corpus is None else ")")
        return demo_corpus(n_rows, seq_len, spec.d_vocab, seed=5), label
    with blame("--corpus"):
        try:
            opened = open_corpus(corpus, seq_len=seq_len, tokenizer=getattr(model, "tokenizer", None), bin_dtype=bin_dtype)
            read = [r for _, r in itertools.islice(opened.rows(), n_rows)]
        except OSError as e:  # a missing or unreadable file (or an unreachable dataset)
            raise CorpusError(f"{corpus}: cannot be read ({e.strerror or e})") from None
        if len(read) < n_rows:
            raise CorpusError(f"{opened.source} has {len(read)} rows of {seq_len} tokens; --rows / --samples ask for {n_rows}")
        table = np.stack(read)
        _check_ids(table, spec.d_vocab, opened.source)
    return table, f"{opened.source} (rows of {seq_len} tokens)"


def _plan_figures(job: PaperJob, args, figures, rows: int, seq_len: int, bos: Optional[int]) -> None:
    model = job.model
    spec = model_spec(model)
    if spec.n_ctx is not None and seq_len > spec.n_ctx:
        raise ValueError(f"--seq-len: {seq_len} exceeds the model's n_ctx {spec.n_ctx}")
    points = min(rows, FIG5_ROWS) * (seq_len - 1 - PAPER_START_POS)
    if "fig5" in figures and points < 3:
        raise ValueError(f"--rows / --seq-len: fig 5 fits positions {PAPER_START_POS} to seq_len - 2 as the paper does and needs "
                         f">= 3 points, {rows} rows of {seq_len} tokens give {max(points, 0)}")
    n_rows = max(rows, job.samples) if "fig4" in figures else rows
    table, job.corpus_label = _figure_rows(args.corpus, model, n_rows, seq_len, getattr(args, "bin_dtype", None))
    if bos is None and args.corpus in (None, DEMO_CORPUS):
        bos = PLANTED["bos"]  # the demo model's writer reads BOS
    table = torch.from_numpy(table.astype(np.int64))
    if bos is not None:  # prepended as the scan does: the row keeps seq_len tokens
        table = torch.cat([torch.full((len(table), 1), bos, dtype=torch.int64), table[:, :-1]], dim=1)
        job.corpus_label += f", BOS {bos} prepended"
    job.batch = table[:rows].to(model_device(model))
    if "fig4" in figures:
        job.donor_rows = table[:job.samples].numpy()
        job.prompts_unavailable = paper_prompts_unavailable(model)
        if job.prompts_unavailable is None:
            job.prompts = paper_prompts(model)
            longest = max(len(ids) for _, ids, _, _ in job.prompts)
            if longest > seq_len:  # each donor is the first tokens of a row, as many as the prompt has
                raise ValueError(f"--seq-len: fig 4's donors are rows' first tokens, as many as the paper's prompts have "
                                 f"({longest}); use --seq-len >= {longest}")


def _scan_corpus_choice(args, summary: dict):
    """The corpus the miner reopens: --corpus when given, else the file the scan read (an in-memory
    corpus cannot be reopened: the user has to say which corpus it was)."""
    if args.corpus is not None:
        return args.corpus
    source = summary["meta"]["corpus"]["source"]
    if source.startswith(HUB_PREFIX):  # a hub dataset: reopened by name
        return source
    if source == "<array>":
        raise ValueError(f"--corpus: the scan in {args.scan_dir} read an in-memory corpus, which cannot be reopened; "
                         f"pass --corpus demo for the synthetic corpus `erasure-fast demo` scans, or the token file it came from")
    if not os.path.exists(source):
        raise ValueError(f"--corpus: the scan read {source}, which is not there any more; pass --corpus with its location")
    return source


def _plan_mine(job: PaperJob, summary: dict, corpus_choice, bin_dtype: Optional[str]) -> None:
    model = job.model
    spec = model_spec(model)
    with blame("--model"):
        check_scan_model(summary, model)
    if corpus_choice == DEMO_CORPUS:
        corpus = demo_corpus(DEMO_SCAN_ROWS, summary["meta"]["seq_len"], spec.d_vocab)
        job.scan_corpus_label = "the synthetic demo corpus (`erasure-fast demo`'s)"
    else:
        corpus = corpus_choice
        job.scan_corpus_label = str(corpus)
    with blame("--corpus"):
        job.scan_corpus = open_scanned_corpus(corpus, summary, tokenizer=getattr(model, "tokenizer", None), bin_dtype=bin_dtype,
                                              name=job.scan_corpus_label)
        scan_candidate_rows(summary, job.scan_corpus, top=MINE_TOP, d_vocab=spec.d_vocab)


def _supported(model, analysis: str, wanted: List[str], writer: str, erasers: List[str]):
    """(the analyses to run, {analysis: why not} for those the model cannot run), decided from the
    model's layout before any forward pass. An analysis asked for by name that the model cannot run is
    refused (a one-line UnsupportedModelError naming --model, the family and why); 'all' leaves such
    figures out and says why in the report, unless it leaves nothing to run."""
    not_run = {}
    for name in wanted:
        heads = dict(writer=writer, erasers=erasers) if name in NEEDS_ERASER_LAYER else {}
        problem = paper_support_problem(model, name, **heads)
        if problem is not None:
            not_run[name] = problem
    if not_run and (analysis != "all" or len(not_run) == len(wanted)):
        raise UnsupportedModelError(f"--model: {' '.join(next(iter(not_run.values())).split())}")
    return [a for a in wanted if a not in not_run], not_run


def plan_job(args) -> PaperJob:
    """Check every prerequisite of the requested analyses and load what they read, in the order of
    cost: the options alone, then the scan (for 'mine'), then the model, then the corpus."""
    if args.analysis not in ANALYSES:
        raise ValueError(f"analysis: must be one of {', '.join(ANALYSES)}, got {args.analysis!r}")
    wanted = list(FIGURES) if args.analysis == "all" else [args.analysis]
    figures = [a for a in wanted if a in FIGURES]
    rows = _int_option(args.rows, "--rows", 1)
    seq_len = _int_option(args.seq_len, "--seq-len", 2)
    samples = _int_option(args.samples, "--samples", 1)
    bos = None if args.prepend_bos is None else _int_option(args.prepend_bos, "--prepend-bos", 0)
    out = _check_out(args.out)
    check_device(args.device, "--device")
    weights = getattr(args, "weights", "auto")
    if weights not in WEIGHTS:
        raise ValueError(f"--weights: must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    writer = _head_label(args.writer, "--writer")
    erasers = None
    if args.erasers is not None:
        if not isinstance(args.erasers, str):
            raise TypeError(f"--erasers: expected comma-separated head labels, got {args.erasers!r}")
        erasers = [e.strip().upper() for e in args.erasers.split(",") if e.strip()]
        if not erasers:
            raise ValueError("--erasers: no heads given (e.g. --erasers L2H3,L2H6)")
    summary = corpus_choice = None
    if "mine" in wanted:
        if not args.scan_dir:
            raise ValueError("--scan-dir: 'mine' needs the output directory of an erasure-fast scan (`erasure-fast scan --out DIR`)")
        with blame("--scan-dir"):
            summary = read_scan_summary(args.scan_dir)
        if summary["focus_writer"] != writer:
            raise ValueError(f"--writer: the scan in {args.scan_dir} ranks examples for {summary['focus_writer']}, not "
                             f"{writer}; use --writer {summary['focus_writer']} or scan with --writers {writer}")
        scan_bos = summary["meta"].get("prepend_bos")
        if bos is not None and bos != scan_bos:
            raise ValueError(f"--prepend-bos: the miner uses the scan's rows as scanned (BOS {scan_bos}); drop --prepend-bos")
        corpus_choice = _scan_corpus_choice(args, summary)

    opened = open_paper_model(args.model, args.device, weights, args.analysis)
    model, default_erasers = opened.model, opened.default_erasers
    with blame("--model"):
        spec = model_spec(model)  # a family per-head attribution cannot cover is refused here
    with blame("--writer"):
        writer = spec.head_label(head_indices(model, [writer], "writer")[0])
    erasers = erasers or default_erasers
    if USES_ERASERS.intersection(wanted):
        with blame("--erasers"):
            erasers = [spec.head_label(e) for e in head_indices(model, erasers, "erasers")]
            if NEEDS_ERASER_LAYER.intersection(wanted):
                eraser_layer(model, writer, erasers)
    if bos is not None and bos >= spec.d_vocab:
        raise ValueError(f"--prepend-bos: {bos} is not a token id of the model (d_vocab {spec.d_vocab})")
    capture = getattr(args, "capture", "auto")
    with blame("--capture"):
        capture_used = resolve_capture(capture, model, spec)
    wanted, not_run = _supported(model, args.analysis, wanted, writer, erasers)
    figures = [a for a in wanted if a in FIGURES]
    job = PaperJob(analyses=wanted, report_name="paper_report.md" if args.analysis == "all" else f"paper_{args.analysis}.md",
                   out=out, opened=opened, writer=writer, erasers=list(erasers),
                   samples=samples, capture=capture, capture_used=capture_used, scan_dir=args.scan_dir if summary is not None else None, not_run=not_run)
    if figures:
        _plan_figures(job, args, figures, rows, seq_len, bos)
    if summary is not None:
        _plan_mine(job, summary, corpus_choice, getattr(args, "bin_dtype", None))
    return job


# ---------------------------------------------------------------------------------------------------
# Running it


def run_job(job: PaperJob) -> int:
    """Run the checked ``job``: each analysis writes its tables and figures into ``job.out``, then the
    report -- this run's numbers next to the paper's, then each figure -- is written and printed. Returns 0."""
    setup = [f"model: {job.opened.label}", f"weights: {PROCESSING_WORDS[job.opened.weights]}",
             f"writer {job.writer}; erasers {', '.join(job.erasers)}"]
    if job.batch is not None:
        setup.append(f"figures: batch {tuple(job.batch.shape)} from {job.corpus_label}")
    if job.donor_rows is not None:
        setup.append(f"fig 4 donors: the first {len(job.donor_rows)} rows of that corpus")
    setup.append(f"capture: {job.capture_used} for runs without interventions; runs with interventions use hooks")
    if job.scan_dir is not None:
        setup.append(f"miner: scan {job.scan_dir}, corpus {job.scan_corpus_label}")
    for name, why in (job.not_run or {}).items():
        setup.append(f"not run: {name}, because {why}")
    print("\n".join(setup))
    os.makedirs(job.out, exist_ok=True)
    head = [f"# The paper's analyses on {job.opened.label}", ""]
    if job.opened.note:
        head += [f"> {job.opened.note}", ""]
    head += [f"- {line}" for line in setup[1:]]
    head += [f"- statistics, in every table: {CONVENTION}", ""]
    md, results = [], {}
    wanted = set(job.analyses)
    if wanted & {"fig1", "fig2"}:
        _report_fig1_fig2(job, md, results)
    if "fig3" in wanted:
        _report_fig3(job, md, results)
    if "fig4" in wanted:
        _report_fig4(job, md)
    if "fig5" in wanted:
        _report_fig5(job, md, results)
    if "fig8" in wanted:
        _report_fig8(job, md)
    if "mine" in wanted:
        _report_mine(job, md)
    md = head + (_report_published(job, results) if wanted & set(FIGURES) else []) + md
    with open(os.path.join(job.out, job.report_name), "w") as f:
        f.write("\n".join(md))
    write_page(_out(job, job.report_name[:-3] + ".html"), markdown_page("\n".join(md), job.out))  # the same, one file
    print("\n".join(md))
    print(f"\nwrote {job.out}/{job.report_name} and its figures")
    return 0


def _out(job: PaperJob, name: str) -> str:
    return os.path.join(job.out, name)


def _cell(text, width: int = 60) -> str:
    """``text`` as one markdown table cell: newlines and tabs shown escaped, pipes escaped, cut to ``width``."""
    return str(text).replace("\n", "\\n").replace("\t", "\\t")[:width].replace("|", "\\|")


def _band(row, prefix: str = "") -> str:
    """A table row's median and 12.5-87.5 % band as text."""
    return f"{row[prefix + 'median']:+.3f} [{row[prefix + 'q0.125']:+.3f}, {row[prefix + 'q0.875']:+.3f}]"


def _report_published(job: PaperJob, results: dict) -> list:
    """The paper's numbers for GELU-4L next to this run's: filled where this run is on GELU-4L with the
    paper's writer, and saying plainly when it is not."""
    comparable = job.opened.gelu_4l and job.writer == "L0H2"
    md = ["## This run next to the paper's published numbers", ""]
    if not job.opened.gelu_4l:
        why = (f"GELU-4L ({GELU_4L_REPO}) is not in the local Hugging Face cache, the only place its weights are read "
               f"from, so this run is on {job.opened.label}" if job.opened.gelu_4l_missing
               else f"this run is on {job.opened.label}, not GELU-4L ({GELU_4L_REPO})")
        md += [f"**Not a reproduction:** {why}. The published numbers are listed for reference only; this run's own "
               "numbers are in the sections below.", ""]
    elif not comparable:
        md += [f"**Not comparable:** the paper's numbers are for the writer L0H2; this run's writer is {job.writer}.", ""]
    if comparable and job.opened.weights != "from_pretrained":
        md += ["The authors loaded GELU-4L with `from_pretrained`'s processing; this run's weights are "
               f"{PROCESSING_WORDS[job.opened.weights]}, so PR between heads can differ (it is not invariant to centring "
               "the writing weights).", ""]
    md += [f"Sizes: the authors used {AUTHORS_SIZES}; this run: "
           + (f"{job.batch.shape[0]} rows of {job.batch.shape[1]} tokens" if job.batch is not None else "no figure batch")
           + (f", fig 4 with {len(job.donor_rows)} donors" if job.donor_rows is not None else "") + ".", "",
           "| figure | quantity | paper (GELU-4L) | this run | difference |", "|---|---|---|---|---|"]
    for figure, what, value, key in PUBLISHED:
        published = f"{value[0]:+.3f} ± {value[1]:.3f}" if isinstance(value, tuple) else f"{value:+.3f}"
        ours = results.get(key) if comparable else None
        if ours is None:
            md.append(f"| {figure} | {what} | {published} | n/a | |")
        elif isinstance(value, tuple):
            md.append(f"| {figure} | {what} | {published} | {ours[0]:+.3f} ± {ours[1]:.3f} | {ours[0] - value[0]:+.3f} |")
        else:
            md.append(f"| {figure} | {what} | {published} | {ours:+.3f} | {ours - value:+.3f} |")
    return md + [""]


def _report_fig1_fig2(job: PaperJob, md: list, results: dict) -> None:
    resid, nodes = fig1_fig2(job.batch, job.writer, model=job.model, out_dir=job.out, capture=job.capture)
    resid.to_csv(_out(job, "fig1_resid_pr.csv"), index=False)
    nodes.to_csv(_out(job, "fig2_node_pr.csv"), index=False)
    results.update({("resid", r["node"]): r["median"] for r in resid.to_dict("records")})
    results.update({("node", r["node"]): r["median"] for r in nodes.to_dict("records")})
    md += ["## Fig. 1 / 2: residual stream and node PR onto " + job.writer, "",
           "![fig1](paper_fig1_resid_pr.png)", "![fig2](paper_fig2_node_pr.png)", "",
           "| residual point | PR median [12.5 %, 87.5 %] |", "|---|---|"]
    md += [f"| {r['node']} | {_band(r)} |" for r in resid.to_dict("records")] + [""]
    down = nodes[nodes.downstream].sort_values("median").head(6)
    md += ["| strongest erasers | PR median [12.5 %, 87.5 %] |", "|---|---|"]
    md += [f"| {r['node']} | {_band(r)} |" for r in down.to_dict("records")] + [""]


def _report_fig3(job: PaperJob, md: list, results: dict) -> None:
    t3 = causal_check(job.model, job.batch, job.writer, job.erasers, out_path=_out(job, "fig3_causal_check.png"))
    t3.to_csv(_out(job, "fig3_causal_check.csv"), index=False)
    results.update({("fig3", r["node"]): r["patched_median"] for r in t3.to_dict("records")})
    layer = eraser_layer(job.model, job.writer, job.erasers)
    md += [f"## Fig. 3: causal check (the writer's clean output removed from the value input of every layer-{layer} "
           f"head, ln1 scale frozen)", "", "![fig3](fig3_causal_check.png)", "",
           "| node | PR clean: median [12.5 %, 87.5 %] | PR patched: median [12.5 %, 87.5 %] |", "|---|---|---|"]
    md += [f"| {r['node']}{' (eraser)' if r['eraser'] else ''} | {_band(r, 'clean_')} | {_band(r, 'patched_')} |"
           for r in t3.to_dict("records")] + [""]


def _report_fig4(job: PaperJob, md: list) -> None:
    import pandas as pd

    dev = model_device(job.model)
    if job.prompts:
        tables = [resample_ablation(job.model, ids[None].to(dev), [good], [bad], job.writer, job.donor_rows,
                                    n_samples=job.samples, labels=[text], capture=job.capture)
                  for text, ids, good, bad in job.prompts]
        t4 = pd.concat(tables, ignore_index=True)
        source = "the paper's four adversarial prompts"
    else:
        prompt_len = min(32, job.batch.shape[1] - 1)
        prompts = job.batch[:4, :prompt_len]
        good = job.batch[:4, prompt_len].tolist()
        bad = np.random.default_rng(0).integers(0, model_spec(job.model).d_vocab, size=len(prompts)).tolist()
        t4 = resample_ablation(job.model, prompts, good, bad, job.writer, job.donor_rows, n_samples=job.samples,
                               capture=job.capture)
        source = (f"corpus windows, true next token vs a random token; not the paper's prompts because "
                  f"{job.prompts_unavailable}")
    t4.to_csv(_out(job, "fig4_resample_ablation.csv"), index=False)
    plot_resample_ablation(t4, job.writer, _out(job, "fig4_resample_ablation.png"))
    md += [f"## Fig. 4: {job.writer}'s DLA vs resample ablation of its input at the last position", "",
           f"Prompts: {source}. Donors: the first {job.samples} corpus rows, cut to the prompt's length; the head's "
           "q/k/v input at the last position is the donor's, earlier positions keep their clean input; clean final "
           "LN scale.", "", "![fig4](fig4_resample_ablation.png)", ""] + _fig4_rows(t4)
    spec = model_spec(job.model)
    if job.prompts and spec.n_layers >= 4 and spec.n_heads >= 8:  # the heads of the authors' fig 4b exist
        t4b = pd.concat([resample_ablation(job.model, ids[None].to(dev), [good], [bad], head, job.donor_rows,
                                           n_samples=job.samples, labels=[f"{head}: {text}"], capture=job.capture)
                         for (text, ids, good, bad), head in zip(job.prompts, FIG4B_HEADS)], ignore_index=True)
        t4b.to_csv(_out(job, "fig4b_resample_ablation.csv"), index=False)
        plot_resample_ablation(t4b, "each prompt's head", _out(job, "fig4b_resample_ablation.png"))
        md += ["### Fig. 4b: the head the authors resample on each prompt", "",
               "![fig4b](fig4b_resample_ablation.png)", ""] + _fig4_rows(t4b)


def _fig4_rows(table) -> list:
    return (["| prompt | clean DLA | resampled DLA: median [12.5 %, 87.5 %] |", "|---|---|---|"]
            + [f"| {_cell(r['prompt'])} | {r['clean_dla']:+.3f} | {_band(r, 'resampled_')} |" for r in table.to_dict("records")]
            + [""])


def _report_fig5(job: PaperJob, md: list, results: dict) -> None:
    batch = job.batch[:FIG5_ROWS]
    t5, fit = v_composition(job.model, batch, job.writer, job.erasers, out_path=_out(job, "fig5_v_composition.png"))
    _, fit_att = v_composition(job.model, batch, job.writer, job.erasers, attention_aware=True,
                               out_path=_out(job, "fig5_v_composition_attention.png"))
    t5.to_csv(_out(job, "fig5_v_composition.csv"), index=False)
    results[("fig5", "slope")] = (fit["slope"], 2 * fit["slope_se"])
    md += ["## Fig. 5: writer DLA vs V-composition DLA", "",
           f"The first {batch.shape[0]} rows of the batch, positions {fit['start_pos']} to {batch.shape[1] - 2} (each with "
           "its next token); least-squares fit, ± 2 standard errors as the paper prints them.", "",
           "![fig5](fig5_v_composition.png) ![fig5a](fig5_v_composition_attention.png)", "",
           f"- same position (paper): slope {fit['slope']:.3f} ± {2 * fit['slope_se']:.3f}, intercept "
           f"{fit['intercept']:.4f} ± {2 * fit['intercept_se']:.4f} (n={fit['n']})",
           f"- attention-aware (this project's variant): slope {fit_att['slope']:.3f} ± {2 * fit_att['slope_se']:.3f}",
           "- published (GELU-4L, L0H2 vs L2H2-L2H7): slope -0.723 ± 0.013", ""]


def _report_fig8(job: PaperJob, md: list) -> None:
    t8 = bos_split(job.model, job.batch, job.writer, job.erasers, out_path=_out(job, "fig8_bos_split.png"),
                   capture=job.capture)
    t8.to_csv(_out(job, "fig8_bos_split.csv"), index=False)
    rows = job.batch.shape[0]
    none_rest = t8.position[t8.rest_zero_rows == rows].tolist()
    later = t8[t8.position >= 1]
    md += [f"## Fig. 8: erasure of the writer's BOS and non-BOS parts (PR of the sum of {', '.join(t8.attrs['heads'])})", "",
           "![fig8](fig8_bos_split.png)", "",
           "Each part computed directly (pattern at position 0 times its value, and pattern at positions >= 1 times "
           "theirs); the last position dropped, as the authors do. Median over positions >= 1 of the per-position "
           f"medians: PR onto the BOS part {np.median(later.pr_bos_median):+.3f}, onto the rest "
           f"{np.median(later.pr_rest_median):+.4g}; BOS share of |r_w|^2 {np.nanmedian(later.bos_share_median):.3f}.",
           ""]
    if none_rest:
        md += [f"No non-BOS part (exactly zero in every row) at position(s) {', '.join(map(str, none_rest[:10]))}"
               f"{' ...' if len(none_rest) > 10 else ''}: PR 0 there, as the authors' sum over heads gives "
               "(position 0 attends to itself only).", ""]


def _report_mine(job: PaperJob, md: list) -> None:
    t = mine_adversarial(job.model, job.scan_dir, job.scan_corpus, writer=job.writer, erasers=job.erasers, top=MINE_TOP)
    t.to_csv(_out(job, "adversarial_candidates.csv"), index=False)
    md += [f"## Candidate adversarial examples for DLA ({job.writer}): largest |DLA| - |adjusted DLA|", "",
           f"Scan: {job.scan_dir}; corpus: {job.scan_corpus_label}.", "",
           "| rank | row | pos | DLA | adjusted DLA | erasers' PR clean -> patched | context |", "|---|---|---|---|---|---|---|"]
    for r in t.itertuples():
        rechecked = "erasers_pr_clean" in t and np.isfinite(r.erasers_pr_clean)
        patch = f"{r.erasers_pr_clean:+.2f} -> {r.erasers_pr_patched:+.2f}" if rechecked else ""
        md.append(f"| {r.rank} | {r.row} | {r.pos} | {r.dla:+.3f} | {r.adjusted_dla:+.3f} | {patch} | {_cell(r.context)} |")
    md.append("")
