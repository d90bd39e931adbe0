"""Stages 2 and 3 of a scan: run the planned batches with checkpoints, then reduce and report.

`ScanJob` (a context manager) locks the output folder, resumes from this rank's checkpoint when its
configuration matches (refusing otherwise, naming what differs), re-reads the corpus part already
aggregated to check that it is unchanged (see `state.chain_hash`), and streams the remaining batches
through the model. SIGINT / SIGTERM stop it cleanly after the current batch: the checkpoint is saved
and `ScanInterrupted` says to rerun to resume (a second Ctrl-C stops at once). ``run(max_batches=k)``
stops after k batches of this call the same way, which is how resume is tested.
"""

from __future__ import annotations

import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch

from ..attribution import run_attribution
from ..version import __version__
from . import checkpoint as ckpt
from .distributed import all_gather, all_reduce_sum, all_true, rank_and_world
from .outdir import CHECKPOINT_DIR, OutputLock, clear_previous_outputs
from .pair_stats import NullReference
from .plan import DLA_BINS, DLA_RANGE, PR_BINS, PR_RANGE, ScanPlan
from .ranking import ranking_meta
from .report import summarize, write_report
from .state import EMPTY_HASH, Aggregates, chain_hash, update


class ScanInterrupted(KeyboardInterrupt):
    """A scan stopped by a signal after saving its checkpoint; running it again resumes it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CorpusChanged(ValueError):
    """The corpus part a checkpoint aggregated is no longer what it was."""


@dataclass
class ScanResult:
    out_dir: str
    summary: "object"  # pandas DataFrame
    meta: dict
    files: Dict[str, str] = field(default_factory=dict)


class _StopSignals:
    """While active in the main thread, SIGINT / SIGTERM set ``requested`` instead of killing the
    scan mid-batch; a second SIGINT raises KeyboardInterrupt at once. Only handlers that are the
    defaults are replaced, and they are restored on exit."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                current = signal.getsignal(sig)
                if current in (signal.default_int_handler, signal.SIG_DFL):
                    self._old[sig] = current
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class ScanJob:
    """One rank's scan of a `ScanPlan`: ``with ScanJob(plan) as job: job.run(); result = job.finish()``."""

    def __init__(self, plan: ScanPlan):
        self.plan = plan
        self.rank, self.world = rank_and_world()
        self.agg = Aggregates(plan.cfg)
        self.null = NullReference.for_scan(plan.spec.W_O, plan.cfg.null_seed, len(plan.cfg.writers))
        self.digest = plan.cfg.digest()
        self.ck_path = os.path.join(plan.out_dir, CHECKPOINT_DIR, f"rank{self.rank}-of-{self.world}.npz")
        self.elapsed_before = 0.0
        self.resumed_from = 0
        self._lock: Optional[OutputLock] = None
        self._t_start = None

    # -- set-up ------------------------------------------------------------------------------
    def __enter__(self) -> "ScanJob":
        # Every step is agreed on by all ranks (a collective), so one rank's refusal stops them all
        # instead of leaving the others waiting; nobody writes before every rank has set up.
        for step in (self._lock_output, self._start_or_resume):
            error = None
            try:
                step()
            except Exception as e:
                error = e
            if not all_true(error is None):
                self._release()
                raise error if error is not None else RuntimeError(
                    "another rank of this scan failed to set up (its error is in its own log)")
        return self

    def _lock_output(self) -> None:
        if self.rank == 0:
            self._lock = OutputLock(self.plan.out_dir).acquire()

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _start_or_resume(self) -> None:
        ckpt.remove_stale_temporaries(self.ck_path)  # a run killed mid-write leaves its temp file behind
        found = ckpt.load(self.ck_path) if self.plan.resume else None
        if found is None:
            clear_previous_outputs(self.plan.out_dir, self.rank, self.world)
            return
        arrays, meta = found
        if meta.get("config_digest") != self.digest:
            diff = self.plan.cfg.differences(meta.get("config", {}))
            raise ValueError(
                f"{self.ck_path} was written by a scan with a different configuration (differs in: "
                f"{', '.join(diff) or 'unknown'}); use another output folder or resume=False (--no-resume)"
            )
        self.agg.load(arrays)
        self.agg.load_counters(meta)
        self.elapsed_before = meta.get("elapsed", 0.0)
        self.resumed_from = self.agg.batches

    # -- the batches ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        meta = dict(config_digest=self.digest, config=self.plan.cfg.as_json(), elapsed=self.elapsed(),
                    **self.agg.counters())
        ckpt.save(self.ck_path, self.agg.state(), meta)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t_start if self._t_start is not None else 0.0)

    def _check_prefix(self, prefix_hash: str) -> None:
        if prefix_hash != self.agg.content_hash:
            raise CorpusChanged(
                f"{self.plan.corpus.source}: the corpus changed since {self.ck_path} was written (its first "
                f"{self.agg.rows:,} rows read by this process no longer hash to the checkpoint's value); "
                "scan it afresh with resume=False (--no-resume) or into another output folder"
            )

    def run(self, max_batches: Optional[int] = None) -> bool:
        """Scan this rank's remaining batches. Returns True when they are all done, False when it
        stopped after ``max_batches`` batches of this call (checkpoint saved). Raises
        ScanInterrupted after a SIGINT / SIGTERM (checkpoint saved)."""
        p, agg = self.plan, self.agg
        spec, corpus, edges = p.spec, p.corpus, p.cfg.position_edges
        bar = self._progress_bar()
        self._t_start = time.perf_counter()
        done_here = 0
        prefix_hash, prefix_checked = EMPTY_HASH, agg.batches == 0
        try:
            with _StopSignals() as stop:
                for b, row_ids, toks in corpus.batches(p.cfg.batch_size, p.max_rows):
                    if b % self.world != self.rank:
                        continue
                    if b < agg.batches:  # aggregated before the checkpoint: re-read only to verify it
                        prefix_hash = chain_hash(prefix_hash, toks)
                        continue
                    if not prefix_checked:
                        self._check_prefix(prefix_hash)
                        prefix_checked = True
                    self._scan_batch(b, row_ids, toks, spec, edges)
                    done_here += 1
                    if bar is not None:
                        bar.update(toks.size)
                    if stop.requested:
                        self.save_checkpoint()
                        raise ScanInterrupted(
                            f"scan interrupted ({stop.requested}) after {agg.tokens:,} tokens; checkpoint saved in "
                            f"{p.out_dir}; run the same scan again (same command / arguments) to resume"
                        )
                    if max_batches is not None and done_here >= max_batches:
                        self.save_checkpoint()
                        return False
                    if done_here % p.checkpoint_every == 0:
                        self.save_checkpoint()
                if not prefix_checked:
                    self._check_prefix(prefix_hash)
                self.save_checkpoint()
                return True
        finally:
            if bar is not None:
                bar.close()

    def _scan_batch(self, b: int, row_ids: np.ndarray, toks: np.ndarray, spec, edges) -> None:
        p, agg = self.plan, self.agg
        if p.corpus.kind != "array":  # array corpora were checked whole by plan_scan
            bad = (toks < 0) | (toks >= spec.d_vocab)
            if bad.any():
                raise p.corpus.id_error(int(row_ids[bad.any(axis=1).argmax()]), toks[bad], spec.d_vocab)
        tokens = torch.from_numpy(toks)
        if p.cfg.prepend_bos is not None:
            tokens = torch.cat([torch.full((tokens.shape[0], 1), p.cfg.prepend_bos), tokens[:, :-1]], dim=1)
        tokens = tokens.to(p.device)
        ids = torch.full_like(tokens, -1)
        ids[:, :-1] = tokens[:, 1:]
        res = run_attribution(p.model, spec, tokens, p.wr, ids, None, include_mlps=True, impl=p.impl, keep_mlp_out=True,
                              capture_mode=p.capture)
        update(agg, res, torch.from_numpy(row_ids), edges, self.null)
        agg.tokens += tokens.numel()
        agg.rows += tokens.shape[0]
        agg.batches = b + 1
        agg.content_hash = chain_hash(agg.content_hash, toks)

    def _progress_bar(self):
        p = self.plan
        if not p.progress or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        n_rows = p.corpus.n_rows if p.max_rows is None else (p.max_rows if p.corpus.n_rows is None else min(p.max_rows, p.corpus.n_rows))
        total = None if n_rows is None else n_rows * p.corpus.seq_len // self.world
        return tqdm(total=total, initial=self.agg.tokens, unit="tok", unit_scale=True,
                    desc=f"scan ({p.impl.NAME})", dynamic_ncols=True)

    # -- reduce and report -----------------------------------------------------------------------
    def finish(self) -> Optional[ScanResult]:
        """Reduce the ranks' aggregates and write the report (rank 0). Returns the `ScanResult` on
        rank 0, None on other ranks."""
        p, agg = self.plan, self.agg
        elapsed = self.elapsed()
        totals = dict(tokens=agg.tokens, rows=agg.rows, elapsed=elapsed, content_hash=agg.content_hash)
        if self.world > 1:
            merged = Aggregates(p.cfg)
            for part in all_gather(agg.state()):  # merged in rank order: deterministic
                other = Aggregates(p.cfg)
                other.load(part)
                merged.merge(other)
            t = all_reduce_sum({"tokens": np.array([agg.tokens]), "rows": np.array([agg.rows])})
            hashes = all_gather({"h": np.frombuffer(bytes.fromhex(agg.content_hash), dtype=np.uint8).copy()})
            combined = EMPTY_HASH
            for part in hashes:
                combined = chain_hash(combined, part["h"].astype(np.int64))
            mx = torch.tensor([elapsed], dtype=torch.float64)
            torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
            totals.update(tokens=int(t["tokens"][0]), rows=int(t["rows"][0]), elapsed=float(mx[0]), content_hash=combined)
            agg = merged
        if self.rank != 0:
            return None
        model = p.model
        meta = dict(
            model=getattr(getattr(model, "cfg", None), "model_name", None) or type(model).__name__,
            model_fingerprint=p.cfg.model_fingerprint, corpus=dict(p.cfg.corpus, content_hash=totals["content_hash"]),
            tokens=totals["tokens"], rows=totals["rows"], backend=p.impl.NAME, capture=p.capture, world_size=self.world,
            elapsed_s=totals["elapsed"],
            tokens_per_s=totals["tokens"] / totals["elapsed"] if totals["elapsed"] > 0 else None,
            writers=p.cfg.writer_labels, seq_len=p.cfg.seq_len, batch_size=p.cfg.batch_size, prepend_bos=p.cfg.prepend_bos,
            position_edges=list(p.cfg.position_edges), pr_hist=dict(lo=PR_RANGE[0], hi=PR_RANGE[1], bins=PR_BINS),
            dla_hist=dict(lo=DLA_RANGE[0], hi=DLA_RANGE[1], bins=DLA_BINS),
            versions=_versions(), machine=platform.platform(), config_digest=self.digest, notes=p.notes,
        )
        summary = summarize(agg, p.cfg)
        meta.update(ranking_meta(summary, p.rank_by))
        files = write_report(p.out_dir, summary, agg, p.cfg, meta) if p.report else {}
        return ScanResult(out_dir=p.out_dir, summary=summary, meta=meta, files=files)


def _versions() -> dict:
    from importlib import metadata

    out = {"erasure_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("transformer-lens", "numpy", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
