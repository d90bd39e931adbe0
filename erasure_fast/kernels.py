"""The Triton kernels: one module per kernel family (`dla_table`, `fused_attribution`, and
`triton_common`, what they share); see `erasure_fast.backends.triton` for how they are dispatched.

Their sources live in the repository's top-level ``kernels/`` folder. This module stands for that
folder wherever the package comes from, so ``erasure_fast.kernels.dla_table`` and the rest import
from a source checkout (``PYTHONPATH=<checkout>``, the C++ extension built in place or not), an
editable install and a built wheel alike, and an edit to a kernel takes effect without a reinstall
where the package is the checkout:

* a checkout or an editable install: ``kernels/`` beside this package's folder;
* a wheel: ``erasure_fast/kernels/``, where ``pip install .`` copies the folder (pyproject.toml).

``kernels/`` has no ``__init__.py``: from a checkout's root (the current directory first on
``sys.path``) it is at most a namespace portion, which never shadows an installed distribution named
``kernels`` (transformers imports one).
"""

import os as _os


def _sources() -> str:
    here = _os.path.dirname(_os.path.abspath(__file__))
    for folder in (_os.path.join(here, "kernels"), _os.path.join(_os.path.dirname(here), "kernels")):
        if _os.path.isfile(_os.path.join(folder, "triton_common.py")):
            return folder
    raise ModuleNotFoundError(f"erasure_fast.kernels: the kernel sources are in neither {here}/kernels (a wheel) "
                              f"nor {_os.path.dirname(here)}/kernels (a source checkout)", name=__name__)


# A package's search path: ``import erasure_fast.kernels.dla_table`` looks here.
__path__ = [_sources()]
__package__ = __name__
if __spec__ is not None:
    __spec__.submodule_search_locations = __path__
