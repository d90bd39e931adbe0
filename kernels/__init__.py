"""Triton kernels, installed as ``erasure_fast.kernels``. The fused attribution kernels land here
(one file per kernel family); see erasure_fast/backends/triton.py for their status."""
