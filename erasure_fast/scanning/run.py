"""`scan()`: stream a token corpus through a model and aggregate DLA and erasure in constant memory.

The three stages are public for callers that need them separately: `plan_scan` (validate
everything, run nothing), `ScanJob.run` (the batches, with checkpoints), `ScanJob.finish` (reduce
and report).
"""

from __future__ import annotations

from typing import Optional

from .job import ScanJob, ScanResult
from .plan import ScanOptions, keyword_signature, plan_scan


@keyword_signature
def scan(model, corpus, **options) -> Optional[ScanResult]:
    """Erasure scan of ``corpus`` through ``model``.

    Args:
        model: any model `erasure_fast.attribute` takes (TransformerLens bridge or HookedTransformer,
            a transformers causal LM, an nnsight LanguageModel or TransformersModel); its own dtype and device are used.
        corpus: a path (.npy, .bin, .txt, .jsonl, a Hugging Face ``save_to_disk`` directory, or
            ``hf:owner/name``), a numpy array of token ids ([n] stream or [rows, R]) or a TokenCorpus.
            How each kind is cut into rows: `erasure_fast.scanning.corpus`.
        **options: keywords, each a field of `ScanOptions`, which lists every option with its default
            and what it does (``writers``, ``out_dir``, ``top_k``, ``rank_by``, ``capture``...); the
            signature names them all. Any other name is a TypeError naming it.

    Returns:
        `ScanResult` on rank 0 (None on other ranks). Under torch.distributed (torchrun) every rank
        takes every world-th batch and the aggregates are reduced before the report.

    Raises:
        ValueError / TypeError (CorpusError, OutputDirError) before any work for bad arguments, a
        missing or malformed corpus, ids outside the vocabulary (array corpora), an unusable or
        locked output folder, or a checkpoint from another configuration or another corpus content;
        ScanInterrupted (a KeyboardInterrupt) after SIGINT / SIGTERM, once the checkpoint is saved.
    """
    plan = plan_scan(model, corpus, ScanOptions.from_keywords("scan", options))
    with ScanJob(plan) as job:
        job.run()
        return job.finish()
