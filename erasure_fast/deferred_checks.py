"""Checks whose outcome stays on the device until it is read, for loops that must not wait on it.

`validate` (contract.py) reads the outcome of each of its data checks -- are z and the extra nodes
finite, is the scale positive, do the ids name rows -- before any backend runs. On a GPU each read
waits for all queued work, so a scan doing that per batch runs at the pace of those waits. Given a
`DeferredChecks`, those checks record a boolean on the device instead; the scan reads them all in one
transfer before each checkpoint (`raise_first`), and refuses to save aggregates that a failed check
covers. The checks are the same; only when their outcome is read changes."""

from __future__ import annotations

from typing import List, Tuple

import torch


class DeferredChecks:
    """Outcomes of checks, kept on their device: ``add(ok, message)`` with ``ok`` a one-element bool
    tensor; `raise_first` reads them all (one transfer) and raises ValueError with the message of the
    first that failed, prefixed with ``where`` as it was when that check was added."""

    def __init__(self):
        self.where = ""  # what the checks added next are about (a scan sets the batch and its rows)
        self._checks: List[Tuple[torch.Tensor, str, str]] = []

    def add(self, ok: torch.Tensor, message: str) -> None:
        self._checks.append((ok.reshape(()), message, self.where))

    def raise_first(self) -> None:
        """Read every outcome added since the last call; ValueError naming the first that failed."""
        if not self._checks:
            return
        checks, self._checks = self._checks, []
        passed = torch.stack([ok.to(checks[0][0].device) for ok, _, _ in checks]).cpu().tolist()
        for good, (_, message, where) in zip(passed, checks):
            if not good:
                raise ValueError(f"{where}: {message}" if where else message)
