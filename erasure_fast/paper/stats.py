"""The statistics of the paper's figures, as its authors computed them: medians as pandas takes them
(the mean of the two middle values of an even count) and bands as seaborn draws
``errorbar=("pi", 75)`` (the 12.5 % and 87.5 % percentiles, linearly interpolated), NaN skipped
(a ratio onto a zero writer output is undefined there). Every paper table uses these, and its
columns say so: ``median``, ``q0.125``, ``q0.875``."""

from __future__ import annotations

import warnings

import numpy as np

BAND = (0.125, 0.875)  # seaborn errorbar=("pi", 75): the central 75 %
COLUMNS = ("median", "q0.125", "q0.875")
CONVENTION = ("median = mean of the two middle values (pandas), band = 12.5-87.5 % percentiles "
              "(seaborn errorbar=('pi', 75)), undefined values (NaN) skipped")


def median_band(values, axis=None):
    """(median, q0.125, q0.875) of ``values`` (array-like, any float dtype, computed in float64)
    along ``axis`` (None: all of it), NaN skipped; NaN where nothing is left."""
    x = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():  # an all-NaN slice is NaN by contract, not worth a warning
        warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
        median = np.nanmedian(x, axis=axis)
        lo, hi = np.nanpercentile(x, [100 * BAND[0], 100 * BAND[1]], axis=axis)
    return median, lo, hi


def band_row(values, prefix: str = "") -> dict:
    """``{prefix}median``, ``{prefix}q0.125``, ``{prefix}q0.875`` of ``values`` (all of it) as floats."""
    return {prefix + name: float(v) for name, v in zip(COLUMNS, median_band(values))}
