"""Triton backend (GPU). The fused Triton kernels are the subject of a later issue; until they land
this backend reports itself unavailable and "auto" falls back to the torch backend on CUDA."""

NAME = "triton"
DEVICES = ("cuda",)


def available() -> tuple[bool, str]:
    return False, "Triton fused kernel not implemented yet (planned: kernels/fused_attribution.py)"


def run(inp):  # pragma: no cover - never selected while unavailable
    raise NotImplementedError("the Triton backend is not implemented yet")
