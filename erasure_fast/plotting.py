"""Figures without pyplot: every plot is a `matplotlib.figure.Figure` rendered by its own Agg canvas,
so no call here selects a matplotlib backend or touches pyplot's global figure list (a notebook keeps
its interactive backend)."""

from __future__ import annotations

import os
from typing import Optional

from .optional_deps import require_optional
from .paths import atomic_write, expand_path

_PURPOSE = "plotting (figures of the scan, the paper and the benchmarks)"


def _matplotlib(name: str = "matplotlib"):
    """matplotlib (or its submodule ``name``), or the error naming the extra that installs it."""
    return require_optional(name, "plots", _PURPOSE)


def new_figure(figsize, nrows: int = 1, ncols: int = 1, **subplot_kw):
    """(figure, axes) like ``plt.subplots``, but owned by the caller (nothing registered globally)."""
    fig = _matplotlib("matplotlib.figure").Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def colormap(name: str):
    """A registered colormap by name (``matplotlib.colormaps``, no pyplot)."""
    return _matplotlib().colormaps[name]


def save(fig, path: Optional[str], dpi: int = 120) -> Optional[str]:
    """Lay out and write ``fig`` to ``path`` (PNG by extension); None writes nothing. The file
    appears complete or not at all (`erasure_fast.paths.atomic_write`); ``~`` and ``$VARS`` are expanded."""
    if not path:
        return None
    path = expand_path(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    return atomic_write(path, lambda temp: fig.savefig(temp, dpi=dpi))
