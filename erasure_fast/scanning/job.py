"""Stages 2 and 3 of a scan: run the planned batches with checkpoints, then reduce and report.

`ScanJob` (a context manager) locks the output folder, lists the files it may write in the folder's
manifest (outdir.py), resumes from this rank's checkpoint when its configuration matches (refusing
otherwise, naming each field that differs and both values), re-reads the corpus part already aggregated
to check that it is unchanged (see `state.chain_rows`; the refusal names the first rows that differ),
and streams the remaining batches through the model. SIGINT / SIGTERM stop it cleanly after the current
batch: the checkpoint is saved and `ScanInterrupted` says to rerun to resume (a second Ctrl-C stops at
once, saving what is consistent). An error after some batches -- a bad line late in a text corpus, an id
outside the vocabulary in a stream -- saves the checkpoint first and says so, so fixing the cause and
rerunning resumes. ``run(max_batches=k)`` stops after k batches of this call the same way, which is how
resume is tested.
"""

from __future__ import annotations

import os
import platform
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch

from ..attribution import run_attribution
from ..deferred_checks import DeferredChecks
from ..device_sync import reads_back_freely
from ..finite import require_finite
from ..errors import reworded
from ..version import __version__
from . import checkpoint as ckpt
from .distributed import all_gather, all_reduce_sum, all_true, rank_and_world
from .outdir import OutputLock, checkpoint_file, clear_previous_outputs, scan_files, write_manifest
from .pair_stats import NullReference
from .plan import DLA_BINS, DLA_RANGE, PR_BINS, PR_RANGE, ScanPlan
from .ranking import ranking_meta
from .report import summarize, write_report
from .state import EMPTY_HASH, Aggregates, chain_hash, chain_rows, update


class ScanInterrupted(KeyboardInterrupt):
    """A scan stopped by a signal after saving its checkpoint; running it again resumes it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CorpusChanged(ValueError):
    """The corpus part a checkpoint aggregated is no longer what it was."""


# Checkpoints of this format hash the corpus row by row and keep a mark per chunk (`Aggregates.hash_marks`),
# the ranking statistics per position bucket, top examples with their token context, and histograms
# whose bins are centred on round values (format 2: one bucket, no context, bins edged on round values).
CHECKPOINT_FORMAT = 3


class _PrefixCheck:
    """Re-reads the rows a checkpoint aggregated, in the chunks it hashed them in, and compares each
    chunk's chained hash with the checkpoint's mark: the first chunk that differs is named."""

    def __init__(self, job: "ScanJob"):
        self.job = job
        self.marks = list(job.agg.hash_marks)
        self.total = job.agg.rows
        self.read = 0  # rows re-read so far
        self.checked = 0  # marks compared so far
        self.hash = EMPTY_HASH
        self.pending = []  # (row ids, tokens) of the chunk being re-read
        self.last_row = -1  # the largest corpus row id in the prefix

    @property
    def done(self) -> bool:
        return self.read >= self.total

    def take(self, row_ids: np.ndarray, toks: np.ndarray):
        """Re-read this rank's next batch; returns (row ids, tokens) of its rows after the prefix."""
        k = min(len(toks), self.total - self.read)
        pos = 0
        while pos < k:
            end, want = self.marks[self.checked]
            n = min(k - pos, end - self.read)
            self.pending.append((row_ids[pos:pos + n], toks[pos:pos + n]))
            self.read += n
            pos += n
            if self.read == end:
                self._compare(want)
        if k:
            self.last_row = max(self.last_row, int(row_ids[k - 1]))
        return row_ids[k:], toks[k:]

    def _compare(self, want: str) -> None:
        ids = np.concatenate([i for i, _ in self.pending])
        self.hash = chain_rows(self.hash, np.concatenate([t for _, t in self.pending]))
        self.pending = []
        self.checked += 1
        if self.hash != want:
            raise self.job.corpus_changed(f"rows {int(ids[0]):,}-{int(ids[-1]):,} no longer hold the tokens it read",
                                          int(ids[0]))

    def finish(self) -> None:
        """The corpus ended: every row of the prefix must have been re-read."""
        if not self.done:
            raise self.job.corpus_changed(f"it now ends after {self.read:,} of the {self.total:,} rows this process "
                                          "had read", None)


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
        # on the batches' device once: a batch then copies nothing there but its tokens and row ids
        self.null = NullReference.for_scan(plan.spec.W_O, plan.cfg.null_seed, len(plan.cfg.writers)).to(plan.device)
        self.digest = plan.cfg.digest()
        self.ck_path = os.path.join(plan.out_dir, checkpoint_file(self.rank, self.world))
        self.elapsed_before = 0.0
        self.resumed_from = 0
        self._saved_tokens = 0  # tokens in the checkpoint on disk (what an error would lose beyond it)
        self._folding = False  # a batch is being folded into the aggregates (they are half-updated)
        self._lock: Optional[OutputLock] = None
        self._t_start = None
        # On a GPU the batches' checks are read at checkpoints, not per batch (deferred_checks.py); a
        # failed one means the aggregates since the last checkpoint must not be saved
        self.checks = None if reads_back_freely(plan.device) else DeferredChecks()
        self._unsaveable: Optional[str] = None
        if self.checks is not None:  # what validate then leaves to its caller: the weights, once
            require_finite("W_O", plan.spec.W_O)
            require_finite("directions", plan.spec.directions)

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
            os.makedirs(self.plan.out_dir, exist_ok=True)
            self._lock = OutputLock(self.plan.out_dir).acquire()
            # listed before any of them is written: a scan killed at any moment leaves no file it does not own
            write_manifest(self.plan.out_dir, self.plan.owned_files | set(scan_files(self.world)))

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _start_or_resume(self) -> None:
        found = ckpt.load(self.ck_path) if self.plan.resume else None
        if found is None:
            clear_previous_outputs(self.plan.out_dir, self.plan.owned_files, self.rank, self.world)
            return
        arrays, meta = found
        again = "use another output folder or resume=False (--no-resume)"
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.ck_path} was written by an earlier erasure_fast (checkpoint format "
                             f"{meta.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}); {again}")
        if meta.get("config_digest") != self.digest:
            diff = self.plan.cfg.differences(meta.get("config", {}))
            raise ValueError(f"{self.ck_path} was written by a scan with a different configuration (differs in: "
                             f"{'; '.join(diff) or 'unknown'}); {again}")
        self.agg.load(arrays)
        self.agg.load_counters(meta, arrays)
        self.elapsed_before = meta.get("elapsed", 0.0)
        self.resumed_from = self.agg.batches
        self._saved_tokens = self.agg.tokens

    # -- the batches ---------------------------------------------------------------------------
    def _read_checks(self) -> None:
        """Read the deferred checks of the batches since the last checkpoint (one transfer); if one
        failed, the aggregates hold its batch: refuse to save them, saying what the checkpoint keeps."""
        if self.checks is None or self._unsaveable is not None:
            return
        try:
            self.checks.raise_first()
        except ValueError as e:
            kept = (f"the checkpoint in {self.plan.out_dir} keeps the {self._saved_tokens:,} tokens before it" if
                    self._saved_tokens else "no checkpoint was saved")
            self._unsaveable = f"{e}; the aggregates since the last checkpoint include that batch, so they are not saved ({kept})"
            raise ValueError(self._unsaveable) from None

    def save_checkpoint(self) -> None:
        self._read_checks()
        if self._unsaveable is not None:
            raise ValueError(self._unsaveable)
        meta = dict(format=CHECKPOINT_FORMAT, config_digest=self.digest, config=self.plan.cfg.as_json(),
                    elapsed=self.elapsed(), **self.agg.counters())
        ckpt.save(self.ck_path, dict(self.agg.state(), **self.agg.mark_arrays()), meta)
        self._saved_tokens = self.agg.tokens

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t_start if self._t_start is not None else 0.0)

    def corpus_changed(self, what: str, row: Optional[int]) -> CorpusChanged:
        where = None if row is None else self.plan.corpus.byte_offset(row)
        return CorpusChanged(
            f"{self.plan.corpus.source}: the corpus changed since {self.ck_path} was written: {what}"
            f"{'' if where is None else f' (byte offset {where})'}; scan it afresh with resume=False (--no-resume) "
            "or into another output folder")

    def run(self, max_batches: Optional[int] = None) -> bool:
        """Scan this rank's remaining batches. Returns True when they are all done, False when it
        stopped after ``max_batches`` batches of this call (checkpoint saved). Raises
        ScanInterrupted after a SIGINT / SIGTERM (checkpoint saved); any other error after new
        batches saves the checkpoint first and says so."""
        p, agg = self.plan, self.agg
        # A checkpoint of a larger max_tokens is re-read whole (to verify it) and reported as it is.
        covered = agg.batches * p.cfg.batch_size  # corpus rows in the batches before the checkpoint
        limit = None if p.max_rows is None else max(p.max_rows, covered)
        prefix = _PrefixCheck(self) if agg.rows else None
        bar = self._progress_bar()
        self._t_start = time.perf_counter()
        done_here = 0
        try:
            with _StopSignals() as stop:
                for b, row_ids, toks in p.corpus.batches(p.cfg.batch_size, limit):
                    if b % self.world != self.rank:
                        continue
                    if prefix is not None and not prefix.done:  # aggregated before the checkpoint: verify it
                        row_ids, toks = prefix.take(row_ids, toks)
                    if p.max_rows is not None:
                        keep = int(np.searchsorted(row_ids, p.max_rows))
                        row_ids, toks = row_ids[:keep], toks[:keep]
                    if not len(toks):
                        continue
                    self._scan_batch(b, row_ids, toks)
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
                if prefix is not None:
                    prefix.finish()
                    if p.max_rows is not None and prefix.last_row >= p.max_rows and self.rank == 0:
                        warnings.warn(f"{self.ck_path} already holds a scan of {agg.tokens:,} tokens, beyond max_tokens "
                                      f"({p.max_rows * p.cfg.seq_len:,} tokens); the report covers all of them "
                                      "(resume=False / --no-resume scans only max_tokens)", stacklevel=2)
                self.save_checkpoint()
                return True
        except ScanInterrupted:
            raise
        except (Exception, KeyboardInterrupt) as e:
            # save what is consistent (never aggregates half-updated by a failing batch), then say so
            saved_now = not self._folding and self._unsaveable is None and agg.tokens > self._saved_tokens
            if saved_now:
                self.save_checkpoint()
            if isinstance(e, KeyboardInterrupt):
                kept = (f"the checkpoint in {p.out_dir} holds {self._saved_tokens:,} tokens" if self._saved_tokens
                        else "no checkpoint was saved")
                raise ScanInterrupted(f"scan stopped at once (a second SIGINT); {kept}; run the same scan again "
                                      "to resume") from None
            if saved_now:
                raise reworded(e, f"{e}; the {agg.tokens:,} tokens scanned before it are saved in {self.ck_path}; fix "
                                  "the cause and run the same scan again to resume") from None
            raise
        finally:
            if bar is not None:
                bar.close()

    def _scan_batch(self, b: int, row_ids: np.ndarray, toks: np.ndarray) -> None:
        p, agg, spec = self.plan, self.agg, self.plan.spec
        if p.corpus.kind != "array":  # array corpora were checked whole by plan_scan
            bad = (toks < 0) | (toks >= spec.d_vocab)
            if bad.any():
                raise p.corpus.id_error(int(row_ids[bad.any(axis=1).argmax()]), toks[bad], spec.d_vocab)
        tokens = torch.from_numpy(toks)
        if p.cfg.prepend_bos is not None:
            tokens = torch.cat([torch.full((tokens.shape[0], 1), p.cfg.prepend_bos), tokens[:, :-1]], dim=1)
        tokens = _to_device(tokens, p.device)
        ids = torch.full_like(tokens, -1)
        ids[:, :-1] = tokens[:, 1:]
        if self.checks is not None:
            self.checks.where = f"batch {b} (corpus rows {int(row_ids[0]):,}-{int(row_ids[-1]):,})"
        res = run_attribution(p.model, spec, tokens, p.wr, ids, None, include_mlps=True, impl=p.impl, keep_mlp_out=True,
                              capture_mode=p.capture, deferred=self.checks)
        self._folding = True  # from here to the end the aggregates are half-updated if anything fails
        update(agg, res, _to_device(torch.from_numpy(row_ids), p.device), p.cfg.position_edges, self.null, tokens)
        agg.batches = b + 1
        agg.read_chunk(toks)
        self._folding = False

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
            tokens=totals["tokens"], rows=totals["rows"], backend=p.impl.NAME, capture=p.capture.mode.value,
            capture_reason=p.capture.reason, world_size=self.world,
            elapsed_s=totals["elapsed"],
            tokens_per_s=totals["tokens"] / totals["elapsed"] if totals["elapsed"] > 0 else None,
            writers=p.cfg.writer_labels, seq_len=p.cfg.seq_len, batch_size=p.cfg.batch_size, prepend_bos=p.cfg.prepend_bos,
            position_edges=list(p.cfg.position_edges), pr_hist=dict(lo=PR_RANGE[0], hi=PR_RANGE[1], bins=PR_BINS),
            dla_hist=dict(lo=DLA_RANGE[0], hi=DLA_RANGE[1], bins=DLA_BINS),
            versions=_versions(), machine=platform.platform(), config_digest=self.digest, notes=p.notes,
        )
        summary = summarize(agg, p.cfg)
        meta.update(ranking_meta(summary, p.rank_by))
        files = write_report(p.out_dir, summary, agg, p.cfg, meta, tokenizer=p.tokenizer) if p.report else {}
        return ScanResult(out_dir=p.out_dir, summary=summary, meta=meta, files=files)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch's host tensor on ``device``; to a GPU through pinned memory without waiting (a copy from
    pageable memory waits for the GPU to finish what is queued; the pinned buffer is kept by torch
    until the copy is done)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _versions() -> dict:
    from importlib import metadata

    out = {"erasure_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("transformer-lens", "numpy", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
