"""Counting the points where torch code would wait for a GPU, on the CPU.

On a GPU, reading a value back to the host -- ``.item()``, ``bool(t)``, ``.tolist()``, ``.numpy()``
after ``.cpu()`` -- or running an operation whose output shape depends on the data (nonzero, unique,
masked_select, boolean indexing, bincount, repeat_interleave without its output size) stops the host
until the GPU has finished everything queued before it. On the CPU none of these costs anything, so
code meant to run on a GPU without such waits is checked here by counting them: `HostReads` is a
context manager that sees every aten operation (a TorchDispatchMode) and every conversion of a tensor
to Python or numpy values, and records each with its name."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# operations that read values back (or size their output from the data) on a GPU
_WAITING_OPS = {
    aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default, aten.bincount.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


def _bool_index(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.count`` (a Counter of names) and ``reads.total``."""

    def __init__(self):
        super().__init__()
        self.count: Counter = Counter()
        self._saved = {}

    @property
    def total(self) -> int:
        return sum(self.count.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WAITING_OPS:
            self.count[str(func)] += 1
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _bool_index(args):
            self.count[f"{func} with a boolean mask"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("numpy", "tolist", "__array__"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _name=name, _original=original, **k):
                self.count[f"Tensor.{_name}"] += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}
        return super().__exit__(*exc)
