"""Where reading a tensor's values back to the host is free.

On a GPU, ``bool(t)``, ``.item()``, ``.cpu()`` and operations whose output size depends on the data
wait until the device has finished all work queued before them; a loop that does one per step (a
scan's batches) runs at the pace of those waits. On the CPU they cost only the read. Code that has
a cheap path guarded by such a read (a finiteness check before a fallback) takes it where
`reads_back_freely` says so, and elsewhere the path that needs no read. Tests force a GPU's choice on
the CPU by replacing this function where it is imported."""

from __future__ import annotations

import torch


def reads_back_freely(device: torch.device) -> bool:
    """True where a value read back from a tensor on ``device`` waits for nothing (the CPU)."""
    return torch.device(device).type == "cpu"
