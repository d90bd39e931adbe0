"""Command line: ``erasure-fast scan | demo | backends``."""

from __future__ import annotations

import argparse
import sys


def _writers(text: str):
    if text == "all":
        return "all"
    return [w.strip() for w in text.split(",") if w.strip()]


def _add_scan_args(p: argparse.ArgumentParser, demo: bool) -> None:
    if not demo:
        p.add_argument("--model", required=True, help="'demo', 'gelu-4l' (local HF cache), owner/name (cached) or a checkpoint dir")
        p.add_argument("--corpus", required=True, help="'demo', .npy / .bin token file, .txt / .jsonl text, or a HF dataset (dir or name)")
        p.add_argument("--out", required=True, help="output directory (report, checkpoints)")
    else:
        p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--writers", default="all" if not demo else "all", help="'all' or comma-separated heads, e.g. L0H2,L1H3")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton"])
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model is)")
    p.add_argument("--resume", dest="resume", action="store_true", default=True, help="continue from the checkpoint in --out (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start afresh")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    if not demo:
        p.add_argument("--prepend-bos", type=int, default=None, metavar="ID", help="put token ID at position 0 of every row")
        p.add_argument("--bin-dtype", default="uint16", choices=["uint16", "uint32", "int32", "int64"])
        p.add_argument("--column", default="tokens", help="token column of a HF dataset")


def _open(args, demo: bool):
    """(model, corpus, BOS id or None, report note or None) for the scan / demo arguments."""
    notes = None
    if demo or args.model == "demo":
        from .demo import planted_model

        model, info = planted_model()
        notes = info["note"]
        if args.device is not None:
            model = model.to(args.device)
    else:
        from .loading import load_model

        model = load_model(args.model, device=args.device)
    if demo or args.corpus == "demo":
        from .demo import demo_corpus

        corpus = demo_corpus(64, args.seq_len or 1024)
        bos = 0
    else:
        from .scanning import open_corpus

        corpus = open_corpus(args.corpus, seq_len=args.seq_len, tokenizer=getattr(model, "tokenizer", None),
                             bin_dtype=args.bin_dtype, column=args.column)
        bos = args.prepend_bos
    return model, corpus, bos, notes


def _print_summary(result) -> None:
    from .scanning.ranking import top_pairs

    pairs = top_pairs(result.summary, 8)
    meta = result.meta
    print(f"\nscanned {meta['tokens']:,} tokens in {meta['elapsed_s']:.1f} s ({meta['tokens_per_s']:,.0f} tokens/s), backend {meta['backend']}")
    print("strongest erasure (downstream node onto writer, median PR [25%, 75%]):")
    for _, r in pairs.iterrows():
        print(f"  {r.node:>6} onto {r.writer:<6} {r['median']:+.3f}  [{r['q0.25']:+.3f}, {r['q0.75']:+.3f}]")
    print(f"report: {result.files.get('report.md')}")


def _init_distributed_from_env() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPUs."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        use_nccl = torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="erasure-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_scan = sub.add_parser("scan", help="erasure scan of a token corpus, with a report")
    _add_scan_args(p_scan, demo=False)
    p_demo = sub.add_parser("demo", help="scan the planted GELU-4L-shaped demo model over a synthetic 64K-token corpus")
    _add_scan_args(p_demo, demo=True)
    sub.add_parser("backends", help="list the backends available here and why others are not")
    p_bench = sub.add_parser("bench", help="benchmark every provider side by side (K1, K2, S1) and write a report")
    p_bench.add_argument("--out", default="benchmarks/results")
    p_bench.add_argument("--device", default=None)
    p_bench.add_argument("--shapes", default="gelu-4l,gpt2-small")
    p_bench.add_argument("--sizes", default=None, help="comma-separated token counts (default: CPU 1K-64K, GPU 1K-1M)")
    p_bench.add_argument("--repeats", type=int, default=5)
    p_bench.add_argument("--budget-s", type=float, default=60.0, help="per-call time budget; slower providers stop growing")
    p_bench.add_argument("--s1-tokens", type=int, default=0, help="also run the scan workload S1 on this many tokens")
    p_bench.add_argument("--providers", default=None, help="comma-separated substrings of provider names to keep")
    p_paper = sub.add_parser("paper", help="the paper's analyses (figs 1-5, 8, miner) on gelu-4l when cached, else the demo model")
    p_paper.add_argument("analysis", nargs="?", default="all", choices=["all", "fig1", "fig2", "fig3", "fig4", "fig5", "fig8", "mine"],
                         help="one analysis, or all of them except the miner (default)")
    p_paper.add_argument("--scan-dir", default=None, help="for 'mine': the output directory of an erasure-fast scan")
    p_paper.add_argument("--model", default="auto", help="auto (gelu-4l if cached, else demo), demo, gelu-4l or a checkpoint dir")
    p_paper.add_argument("--corpus", default="demo", help="'demo' or a token corpus path")
    p_paper.add_argument("--out", default="paper_out")
    p_paper.add_argument("--writer", default="L0H2")
    p_paper.add_argument("--erasers", default=None, help="comma-separated heads of one layer (default: the paper's L2H2-L2H7, or the demo's planted ones)")
    p_paper.add_argument("--rows", type=int, default=4)
    p_paper.add_argument("--seq-len", type=int, default=256)
    p_paper.add_argument("--samples", type=int, default=10, help="resamples per prompt for fig 4")
    p_paper.add_argument("--prepend-bos", type=int, default=None)
    p_paper.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.command in ("scan", "demo"):
        demo = args.command == "demo"
        from .scanning import scan

        _init_distributed_from_env()

        model, corpus, bos, notes = _open(args, demo)
        result = scan(model, corpus, writers=_writers(args.writers), seq_len=args.seq_len, batch_size=args.batch_size,
                      out_dir=args.out, resume=args.resume, backend=args.backend, max_tokens=args.max_tokens,
                      prepend_bos=bos, checkpoint_every=args.checkpoint_every, progress=args.progress, notes=notes)
        if result is not None:
            _print_summary(result)
            if demo:
                from .demo import PLANTED
                from .scanning.ranking import top_pairs

                top = top_pairs(result.summary, 1).iloc[0]
                first = next(iter(PLANTED["erasers"]))
                found = top.node == first and top.writer == PLANTED["writer"]
                print(f"planted pair {first} onto {PLANTED['writer']} is the top pair: {'yes' if found else 'NO'}")
                return 0 if found else 1
    elif args.command == "paper":
        from .paper.cli import run as run_paper

        return run_paper(args)
    elif args.command == "bench":
        from . import bench

        out = bench.run(args.out, device=args.device, shapes=args.shapes.split(","),
                        sizes=[int(x) for x in args.sizes.split(",")] if args.sizes else None, repeats=args.repeats,
                        budget_s=args.budget_s, s1_tokens=args.s1_tokens,
                        providers=args.providers.split(",") if args.providers else None,
                        command="erasure-fast " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(open(out["files"]["md"]).read())
        print("files:", ", ".join(out["files"].values()))
    elif args.command == "backends":
        from .backends import available_backends

        for name, info in available_backends().items():
            print(f"{name:7s} {'available' if info.available else 'unavailable'}: {info.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
