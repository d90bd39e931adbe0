"""Large-corpus erasure scans: corpus -> lean forward -> fused attribution -> constant-memory aggregates -> report."""

from .corpus import CorpusError, TokenCorpus, open_corpus
from .run import ScanResult, scan

__all__ = ["scan", "ScanResult", "open_corpus", "TokenCorpus", "CorpusError"]
