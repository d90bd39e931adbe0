"""Large-corpus erasure scans: corpus -> lean forward -> fused attribution -> constant-memory
aggregates -> report. `scan` runs the whole job; `plan_scan` / `ScanJob` are its stages;
`ScanOptions` is every option of a scan, with its default."""

from .corpus import CorpusError, TokenCorpus, open_corpus
from .job import CorpusChanged, ScanInterrupted, ScanJob, ScanResult
from ..paths import OutputDirError
from .plan import ScanOptions, ScanPlan, plan_scan
from .run import scan

__all__ = ["scan", "ScanOptions", "ScanResult", "plan_scan", "ScanPlan", "ScanJob", "ScanInterrupted", "CorpusChanged",
           "open_corpus", "TokenCorpus", "CorpusError", "OutputDirError"]
