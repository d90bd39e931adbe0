"""`scan()`: stream a token corpus through a model and aggregate DLA and erasure in constant memory.

The three stages are public for callers that need them separately: `plan_scan` (validate
everything, run nothing), `ScanJob.run` (the batches, with checkpoints), `ScanJob.finish` (reduce
and report).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from ..capture_modes import CaptureMode
from .job import ScanJob, ScanResult
from .plan import POSITION_EDGES, plan_scan


def scan(
    model,
    corpus,
    *,
    writers="all",
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    out_dir="scan_out",
    resume: bool = True,
    backend: str = "auto",
    max_tokens: Optional[int] = None,
    prepend_bos: Optional[int] = None,
    checkpoint_every: int = 20,
    top_k: int = 20,
    position_edges: Sequence[int] = POSITION_EDGES,
    progress: bool = True,
    report: bool = True,
    tokenizer=None,
    notes: Optional[str] = None,
    bin_dtype: Optional[str] = None,
    column: Optional[str] = None,
    rank_by: str = "es",
    capture: Union[str, CaptureMode] = "auto",
    overwrite: bool = False,
) -> Optional[ScanResult]:
    """Erasure scan of ``corpus`` through ``model``.

    Args:
        model: any model `erasure_fast.attribute` takes (TransformerLens bridge or HookedTransformer,
            a transformers causal LM, an nnsight LanguageModel); its own dtype and device are used.
        corpus: a path (.npy, .bin, .txt, .jsonl, a Hugging Face ``save_to_disk`` directory, or
            ``hf:owner/name``), a numpy array of token ids ([n] stream or [rows, R]) or a TokenCorpus.
            How each kind is cut into rows: `erasure_fast.scanning.corpus`.
        writers: "all" or heads (index, (layer, head) or "L0H2"), each at most once.
        seq_len: row length (needed for 1-D streams; defaults to a 2-D array's row length, else 1024).
            Stored rows longer than seq_len are cut into several windows.
        batch_size: rows per forward pass.
        out_dir: where checkpoints and the report go; locked while the scan runs. A folder holding
            files no scan wrote there is refused (see ``overwrite``). ``~`` and ``$VARS`` are expanded
            in every path argument.
        resume: continue from ``out_dir``'s checkpoint when its configuration matches and the corpus
            part it aggregated is unchanged (a corpus that grew, moved or changed after that part
            resumes; a smaller ``max_tokens`` reports the checkpoint's larger scan, with a warning);
            False starts afresh (removing the files a previous scan wrote there).
        backend: "auto", "torch", "cpp" or "triton".
        max_tokens: stop after this many tokens (whole rows).
        prepend_bos: a token id to put at position 0 of every row (the row keeps seq_len tokens).
        checkpoint_every: batches between checkpoints.
        top_k: example positions kept for every writer, of each kind (strongest erasure; |DLA| - |adjusted
            DLA|), each with the ids of the tokens around it (summary.json, report.html, report.md).
        position_edges: position buckets for the BOS split (default: 0 | 1-15 | 16-127 | 128+).
        progress: a progress bar (rank 0).
        report: write summary.parquet / .csv / .json, report.md, report.html and plots into ``out_dir``.
        tokenizer: tokenises text corpora and decodes the report's token contexts (default: the
            model's own; without one the report shows token ids).
        notes: a line for the top of the report (e.g. that the model is synthetic).
        bin_dtype: the dtype of a raw ``.bin`` corpus (uint16, uint32, int32, int64); required for .bin.
        column: the token column of a Hugging Face dataset (default "tokens"; only for datasets).
        rank_by: the report's ranking statistic: "es" (erasure score PR * |cos| * |w| / |x|, the
            default), "apr", "pr", "pv" or "cos"
            (`erasure_fast.scanning.ranking`); the report can be re-ranked by running the finished scan
            again with another value (nothing is recomputed).
        capture: "auto" (the capture engine where it covers the model, else TransformerLens hooks),
            "engine" or "hooks" (`erasure_fast.engine`); the report records which was used and why.
            Not part of the configuration: a scan may resume under the other (same numbers to
            rounding). A model with hooks attached (TransformerLens hook points, torch forward hooks)
            is run through them ("hooks"), or refused where it cannot be (`erasure_fast.models.hooks`).
        overwrite: scan into ``out_dir`` although it holds files no scan wrote there. The scan still
            writes only its own file names (replacing files of those names) and removes only files
            a scan wrote (listed in the folder's manifest); the corpus is never written or removed.

    Returns:
        `ScanResult` on rank 0 (None on other ranks). Under torch.distributed (torchrun) every rank
        takes every world-th batch and the aggregates are reduced before the report.

    Raises:
        ValueError / TypeError (CorpusError, OutputDirError) before any work for bad arguments, a
        missing or malformed corpus, ids outside the vocabulary (array corpora), an unusable or
        locked output folder, or a checkpoint from another configuration or another corpus content;
        ScanInterrupted (a KeyboardInterrupt) after SIGINT / SIGTERM, once the checkpoint is saved.
    """
    plan = plan_scan(model, corpus, writers=writers, seq_len=seq_len, batch_size=batch_size, out_dir=out_dir,
                     resume=resume, backend=backend, max_tokens=max_tokens, prepend_bos=prepend_bos,
                     checkpoint_every=checkpoint_every, top_k=top_k, position_edges=position_edges,
                     progress=progress, report=report, tokenizer=tokenizer, notes=notes, bin_dtype=bin_dtype,
                     column=column, rank_by=rank_by, capture=capture, overwrite=overwrite)
    with ScanJob(plan) as job:
        job.run()
        return job.finish()
