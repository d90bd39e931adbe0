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
from torch.utils._pytree import tree_flatten

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


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class HostReads(TorchDispatchMode):
    """``with HostReads(host=...) as reads: ...`` then ``reads.count`` (a Counter of names) and
    ``reads.total``. ``host``: tensors that live on the host even where the work runs on a GPU (a
    scan's list of writers); reading them, or what is computed from them alone, is not counted."""

    def __init__(self, host=()):
        super().__init__()
        self.count: Counter = Counter()
        self._saved = {}
        self._host = {_storage(t) for t in host}
        self._alive = list(host)  # kept, so that no other tensor is given their memory while counting

    def _on_host(self, tensors) -> bool:
        return bool(tensors) and all(_storage(t) in self._host for t in tensors)

    @property
    def total(self) -> int:
        return sum(self.count.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_host = self._on_host(inputs)
        if on_host:
            pass
        elif func in _WAITING_OPS:
            self.count[str(func)] += 1
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _bool_index(args):
            self.count[f"{func} with a boolean mask"] += 1
        out = func(*args, **kwargs)
        if on_host:  # computed from host tensors alone: on the host too
            made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self._host.update(_storage(t) for t in made)
            self._alive.extend(made)
        return out

    def __enter__(self):
        for name in ("numpy", "tolist", "__array__"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _name=name, _original=original, **k):
                if not self._on_host([t]):
                    self.count[f"Tensor.{_name}"] += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}
        return super().__exit__(*exc)
