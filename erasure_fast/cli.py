"""Command line: ``erasure-fast scan | demo | paper | bench | backends``.

User errors (a missing corpus, a bad flag value, a locked output folder, ...) print one line,
``erasure-fast: error: ...``, and exit with status 2; ``--debug`` shows the traceback instead. An
interrupted scan (Ctrl-C, SIGTERM) saves its checkpoint, says how to resume and exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import warnings

from .capture_modes import CaptureMode  # light: no torch
from .optional_deps import OptionalDependencyError  # light: no torch

DESCRIPTION = """\
Fused DLA and erasure analysis of transformer language models.

commands:
  scan      erasure scan of a token corpus through a model, with a report (resumable)
  demo      scan the planted GELU-4L-shaped demo model over a synthetic 64K-token corpus
  paper     the paper's analyses (figs 1-5, 8, adversarial-example miner)
  bench     benchmark every provider side by side against TransformerLens (K1, K2, S1)
  backends  list the compute backends available here, and why others are not
  view      open a scan's report.html in a browser (or print its file:// URL)

Run `erasure-fast COMMAND --help` for a command's options."""

class _HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Every option with its default, except where there is none to show: a required option, or a
    default of None (the help says what happens then)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Argument errors in the command's one-line form (``erasure-fast: error: ...``, exit status 2)."""

    def error(self, message):
        self.exit(2, f"erasure-fast: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# --debug is taken before the command and after it ("erasure-fast scan ... --debug"); after it, it
# sets the same attribute, and leaves it alone when absent (SUPPRESS)
_DEBUG = argparse.ArgumentParser(add_help=False)
_DEBUG.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")


def _writers(text: str):
    if text == "all":
        return "all"
    return [w.strip() for w in text.split(",") if w.strip()]


def _add_scan_args(p: argparse.ArgumentParser, demo: bool) -> None:
    if not demo:
        p.add_argument("--model", required=True,
                       help="'demo' (planted GELU-4L-shaped model), 'gelu-4l' (local Hugging Face cache), a cached "
                            "owner/name repo, or a checkpoint directory: TransformerLens-style, or a Hugging Face "
                            "checkpoint of any family TransformerLens 4 bridges")
        p.add_argument("--corpus", required=True,
                       help="'demo' (synthetic), a .npy / .bin token file, .txt / .jsonl text, a Hugging Face "
                            "save_to_disk directory, or hf:owner/name (hub, streamed)")
        p.add_argument("--out", required=True, help="output folder (report and checkpoints; locked while the scan runs)")
    else:
        p.add_argument("--out", default="demo_out", help="output folder (report and checkpoints)")
    p.add_argument("--writers", default="all", help="'all' or comma-separated heads, e.g. L0H2,L1H3 (each once)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (whole rows); default: all")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row; default: a 2-D array's row length, else 1024 (1-D .npy/.bin need it); "
                        "longer stored rows are cut into several windows")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton"],
                   help="attribution backend (auto: cpp on CPU, triton on CUDA)")
    p.add_argument("--capture", default="auto", choices=[m.value for m in CaptureMode],
                   help="how activations are captured: the engine (no hook machinery: the forward from the weights, or "
                        "a Hugging Face model's own modules with fused attention), "
                        "TransformerLens hooks, or auto (the engine where it covers the model)")
    p.add_argument("--device", default=None, help="e.g. cuda or cpu; default: where the model is")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from the checkpoint in --out when the configuration and corpus match")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start afresh, replacing a previous scan's outputs in --out")
    p.add_argument("--force", action="store_true",
                   help="scan into --out although it holds files no scan wrote there (the scan writes only its own "
                        "file names, replacing files of those names, and removes only files a scan wrote)")
    p.add_argument("--checkpoint-every", type=int, default=20, help="batches between checkpoints")
    p.add_argument("--top-k", type=int, default=20,
                   help="example positions kept for every writer, of each kind (strongest erasure; |DLA| - |adjusted "
                        "DLA|), with the tokens around them: all in summary.json and report.html")
    p.add_argument("--rank-by", default="es", choices=["es", "apr", "pr", "pv", "cos"],
                   help="statistic that ranks the (node, writer) pairs: es = erasure score PR * |cos| * |w| / |x|, "
                        "apr = PR * |cos|, pr = the paper's projection ratio, pv = projection value, cos; rerunning "
                        "a finished scan with another value re-ranks it without recomputing")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True, help="no progress bar")
    if not demo:
        p.add_argument("--prepend-bos", type=int, default=None, metavar="ID",
                       help="put token ID at position 0 of every row (the row keeps seq-len tokens)")
        p.add_argument("--bin-dtype", default=None, choices=["uint16", "uint32", "int32", "int64"],
                       help="dtype of a raw .bin corpus (required for .bin: the file has no header)")
        p.add_argument("--column", default=None, help="token column of a Hugging Face dataset (default: tokens)")


def _open(args, demo: bool):
    """(model, corpus, BOS id or None, report note or None) for the scan / demo arguments."""
    notes = None
    if demo or args.model == "demo":
        from .demo import planted_model

        model, info = planted_model()
        notes = info["note"]
        if args.device is not None:
            model = model.to(args.device)  # checked by _scan
    else:
        from .errors import blame
        from .loading import load_model

        with blame("--model"):
            model = load_model(args.model, device=args.device)
    bos = None if demo else args.prepend_bos
    if demo or args.corpus == "demo":
        from .demo import PLANTED, demo_corpus

        corpus = demo_corpus(64, args.seq_len or 1024)
        bos = PLANTED["bos"] if bos is None else bos
    else:
        corpus = args.corpus
    return model, corpus, bos, notes


def _print_summary(result) -> None:
    from .scanning.ranking import STATISTIC_NAMES, null_verdict, top_pairs

    meta = result.meta
    by = meta["rank_by"]
    pairs = top_pairs(result.summary, 8, by)
    print(f"\nscanned {meta['tokens']:,} tokens in {meta['elapsed_s']:.1f} s ({meta['tokens_per_s'] or 0:,.0f} tokens/s), "
          f"backend {meta['backend']}")
    dropped = meta["corpus"].get("dropped_tokens")
    if dropped:
        print(f"note: {dropped:,} corpus tokens lie in no row of {meta['seq_len']} (remainders after the last whole row)")
    name = STATISTIC_NAMES[by]
    q1, q3 = ("q0.25", "q0.75") if by == "pr" else (f"{by}_q0.25", f"{by}_q0.75")
    threshold = meta["null_threshold"]
    shown = "none" if math.isnan(threshold) else f"{threshold:+.3f}"
    print(f"strongest erasure by median {name} ({meta['rank_formula']}); null threshold {shown}:")
    print(f"  {'node':>6}      {'writer':<6} {name:>7}  [25%, 75%]           PR      cos   above null")
    for _, r in pairs.iterrows():
        print(f"  {r.node:>6} onto {r.writer:<6} {r['rank_statistic']:+.3f}  [{r[q1]:+.3f}, {r[q3]:+.3f}]  "
              f"{r['median']:+.3f}  {r['cos_median']:+.3f}  {'yes' if r['above_null'] else 'no'}")
    print(null_verdict(meta))
    print(f"report: {result.files.get('report.md')}")
    if result.files.get("report.html"):
        print(f"interactive report: {result.files['report.html']} (`erasure-fast view {result.out_dir}` opens it)")


def _init_distributed_from_env() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPUs. Returns
    whether this call created it (and so must destroy it)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        use_nccl = torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo")
        return True
    return False


def _leave_distributed(wait: bool) -> None:
    """Wait for every rank (``wait``), then tear the process group down: a rank that exits with the
    group alive can abort in the communication library's threads ("terminate called ...")."""
    import torch

    if torch.distributed.is_initialized():
        try:
            if wait:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


def _run_scan(args, demo: bool) -> int:
    joined = _init_distributed_from_env()
    ok = False
    try:
        rc = _scan(args, demo)
        ok = True
        return rc
    finally:
        if joined:
            _leave_distributed(wait=ok)  # after an error the other ranks may be gone: do not wait for them


# Scan options the scan / demo flags keep under another name; every other flag whose dest is an option's
# name (--batch-size: batch_size) sets that option, and options without a flag keep their defaults.
_OPTION_DESTS = {"out_dir": "out", "overwrite": "force"}


def _scan_options(args):
    """The `ScanOptions` the scan / demo flags give (checked there: a bad value is refused before the
    model is loaded), less what `_open` decides (the BOS id, the report's note)."""
    from dataclasses import fields

    from .scanning import ScanOptions

    given = {f.name: getattr(args, _OPTION_DESTS.get(f.name, f.name)) for f in fields(ScanOptions)
             if hasattr(args, _OPTION_DESTS.get(f.name, f.name))}
    given["writers"] = _writers(args.writers)
    return ScanOptions(**given)


def _scan(args, demo: bool) -> int:
    from dataclasses import replace

    from .loading import check_device
    from .scanning import plan_scan
    from .scanning.job import ScanJob
    from .scanning.outdir import check_scan_dir

    # the quick checks first, before a model is loaded (which can take minutes)
    check_device(args.device, "--device")
    options = _scan_options(args)
    check_scan_dir(options.out_dir, "--out", overwrite=options.overwrite, create=False)
    model, corpus, bos, notes = _open(args, demo)
    plan = plan_scan(model, corpus, replace(options, prepend_bos=bos, notes=notes))
    with ScanJob(plan) as job:
        if job.resumed_from:
            print(f"resuming {args.out} after {job.agg.tokens:,} tokens", file=sys.stderr)
        job.run()
        result = job.finish()
    if result is None:  # not rank 0
        return 0
    _print_summary(result)
    if demo:
        from .demo import PLANTED
        from .scanning.ranking import top_pairs

        planted = [(eraser, PLANTED["writer"]) for eraser in PLANTED["erasers"]]
        top = list(zip(*(top_pairs(result.summary, len(planted), args.rank_by)[c] for c in ("node", "writer"))))
        found = sorted(top) == sorted(planted)
        print(f"planted pairs {', '.join(f'{e} onto {w}' for e, w in planted)} are the top {len(planted)}: "
              f"{'yes' if found else 'NO'}")
        return 0 if found else 1
    return 0


def _run_bench(args, argv) -> int:
    from . import bench

    def ints(flag, text):
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None

    try:
        out = bench.run(args.out, device=args.device, shapes=[s.strip() for s in args.shapes.split(",") if s.strip()],
                        sizes=ints("--sizes", args.sizes) if args.sizes else None, repeats=args.repeats,
                        budget_s=args.budget_s, round_budget_s=args.round_budget_s, s1_tokens=args.s1_tokens,
                        s1_dtype=args.s1_dtype, dtype=args.dtype, c1_families=[f.strip() for f in args.c1_families.split(",") if f.strip()],
                        providers=[p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None,
                        command="erasure-fast " + " ".join(argv if argv is not None else sys.argv[1:]))
    except RuntimeError as e:  # the measuring child failed; its stderr has been shown as it ran
        if args.debug:
            raise
        print(f"erasure-fast: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    with open(out["files"]["md"]) as f:
        print(f.read())
    print("files:", ", ".join(out["files"].values()))
    return 0


# Library argument names -> the scan / demo flags that set them: an error from `scan` that starts with
# the argument's name is shown with the flag the user typed.
_SCAN_FLAGS = {"max_tokens": "--max-tokens", "batch_size": "--batch-size", "checkpoint_every": "--checkpoint-every",
               "seq_len": "--seq-len", "writers": "--writers", "prepend_bos": "--prepend-bos", "out_dir": "--out",
               "top_k": "--top-k", "bin_dtype": "--bin-dtype", "backend": "--backend", "rank_by": "--rank-by",
               "capture": "--capture", "column": "--column", "corpus": "--corpus", "model": "--model",
               "device": "--device", "overwrite": "--force"}


def _as_flag(command: str, message: str) -> str:
    if command in ("scan", "demo"):
        first = re.match(r"\w+", message)
        if first and first.group(0) in _SCAN_FLAGS:
            return _SCAN_FLAGS[first.group(0)] + message[first.end():]
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="erasure-fast", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = dict(formatter_class=_HELP, parents=[_DEBUG])
    p_scan = sub.add_parser("scan", help="erasure scan of a token corpus, with a report", **common,
                            description="Erasure scan of a token corpus, with a report; resumable, one scan per --out.")
    _add_scan_args(p_scan, demo=False)
    p_demo = sub.add_parser("demo", help="scan the planted demo model over a synthetic 64K-token corpus", **common,
                            description="Scan the planted GELU-4L-shaped demo model over 64 x 1024 synthetic tokens; "
                                        "exits 1 unless the planted pairs are the top pairs.")
    _add_scan_args(p_demo, demo=True)
    sub.add_parser("backends", help="list the backends available here and why others are not", **common)
    p_view = sub.add_parser("view", help="open a scan's report.html in a browser (or print its file:// URL)", **common,
                            description="Open the report page of a scan's output folder (report.html; in an `erasure-fast "
                                        "paper` folder its page) in a browser; where none can be opened (no display), "
                                        "print its file:// URL.")
    p_view.add_argument("out", metavar="OUT", help="a scan's --out folder (or `erasure-fast paper`'s, or an .html report)")
    p_bench = sub.add_parser("bench", help="benchmark every provider side by side (K1, K2, S1) and write a report",
                             **common)
    p_bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON / CSV / markdown / PNG report")
    p_bench.add_argument("--device", default=None, help="cpu or cuda; default: cuda when available")
    p_bench.add_argument("--shapes", default="gelu-4l,gpt2-small", help="comma-separated model shapes (gelu-4l, gpt2-small)")
    p_bench.add_argument("--sizes", default=None, help="comma-separated token counts; default: CPU 1K-64K, GPU 1K-1M")
    p_bench.add_argument("--repeats", type=int, default=5,
                         help="least number of interleaved timing rounds per point (more until the speedups settle)")
    p_bench.add_argument("--budget-s", type=float, default=60.0,
                         help="a provider whose first call takes longer is not timed at this or larger sizes")
    p_bench.add_argument("--round-budget-s", type=float, default=None,
                         help="wall time of one point's interleaved timing rounds; default: --budget-s")
    p_bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="the model's and activations' dtype in K1 / K2 (roofline: that dtype's matmul rate)")
    p_bench.add_argument("--s1-tokens", type=int, default=0, help="also run the scan workload S1 on this many tokens (0: no)")
    p_bench.add_argument("--s1-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="the model's dtype in the scan workload S1 and capture workload C1 (half precision: GPU)")
    p_bench.add_argument("--c1-families", default="",
                         help="comma-separated Hugging Face families (llama, gpt_neox, gemma2) whose capture C1 also "
                              "times, bridge hooks vs engine, on S1's corpus (needs --s1-tokens)")
    p_bench.add_argument("--providers", default=None, help="comma-separated substrings of provider names to keep; default: all")
    p_paper = sub.add_parser("paper", help="the paper's analyses (figs 1-5, 8, miner) on gelu-4l when cached, else the demo model",
                             **common)
    from .paper.cli import add_arguments as add_paper_arguments

    add_paper_arguments(p_paper)
    return parser


def _dispatch(args, argv) -> int:
    if args.command in ("scan", "demo"):
        return _run_scan(args, demo=args.command == "demo")
    if args.command == "paper":
        from .paper.cli import run as run_paper

        return run_paper(args)
    if args.command == "bench":
        return _run_bench(args, argv)
    if args.command == "view":
        from .webpage.view import view

        url, opened = view(args.out)
        if not opened:
            print("erasure-fast: no browser can be opened here (no display); open this in one:", file=sys.stderr)
        print(url)
        return 0
    from .backends import available_backends

    for name, info in available_backends().items():
        print(f"{name:7s} {'available' if info.available else 'unavailable'}: {info.detail}")
    return 0


# What each command imports before it starts work (torch comes with the parser).
_START_UP_IMPORTS = {"scan": ("erasure_fast.loading", "erasure_fast.scanning.job", "erasure_fast.scanning.ranking"),
                     "demo": ("erasure_fast.demo", "erasure_fast.scanning.job", "erasure_fast.scanning.ranking"),
                     "paper": ("erasure_fast.paper.cli",), "bench": ("erasure_fast.bench",)}


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C is held while the command imports torch and its own modules, and raised as
    KeyboardInterrupt once they have loaded. A KeyboardInterrupt raised inside a C extension's import
    can abort the process (pybind11's error_already_set thrown where C++ cannot propagate it:
    "terminate called ...", exit -6) or leave the interpreter marked to die by SIGINT at exit however
    it is caught; held here, it is raised in Python, between imports, and answered in one line."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # not ours to change (an embedding application's handler, or not the main thread)
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _parse_and_import(argv):
    """The parsed arguments, with the command's modules imported (Ctrl-C held meanwhile)."""
    import importlib

    with _interrupts_held():
        args = build_parser().parse_args(argv)  # the parser imports torch (the paper's options): a long start-up
        for module in _START_UP_IMPORTS.get(args.command, ()):
            importlib.import_module(module)
    return args


def main(argv=None) -> int:
    args = None
    try:
        args = _parse_and_import(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return _dispatch(args, argv)
    except KeyboardInterrupt as e:  # a scan's own (ScanInterrupted) says what it saved; Ctrl-C elsewhere stops
        print(f"erasure-fast: {e if str(e) else 'interrupted'}", file=sys.stderr)
        _leave_quietly_on_sigint()
        return 130
    except OptionalDependencyError as e:  # a broken install, not a user error: one line with its cause, exit 1
        if args is None or args.debug:
            raise
        print(f"erasure-fast: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as e:  # user errors: one line, exit 2 (--debug: traceback)
        if args is None or args.debug:
            raise
        message = _as_flag(args.command, " ".join(str(e).split()) or type(e).__name__)
        print(f"erasure-fast: error: {message}", file=sys.stderr)
        return 2


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"erasure-fast: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def _leave_quietly_on_sigint() -> None:
    """After an interrupt the process only exits: a further Ctrl-C then ends it at once, without a
    traceback from whatever exit handler it lands in."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
