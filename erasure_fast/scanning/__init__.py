"""Large-corpus erasure scans: corpus -> lean forward -> fused attribution -> constant-memory
aggregates -> report. `scan` runs the whole job; `plan_scan` / `ScanJob` are its stages."""

from .corpus import CorpusError, TokenCorpus, open_corpus
from .job import CorpusChanged, ScanInterrupted, ScanJob, ScanResult
from ..paths import OutputDirError
from .plan import ScanPlan, plan_scan
from .run import scan

__all__ = ["scan", "ScanResult", "plan_scan", "ScanPlan", "ScanJob", "ScanInterrupted", "CorpusChanged",
           "open_corpus", "TokenCorpus", "CorpusError", "OutputDirError"]
