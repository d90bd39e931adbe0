"""`erasure-fast view OUT`: find the report page of an output folder and open it in a browser, or
say where it is when no browser can be opened here."""

from __future__ import annotations

import glob
import os
import sys
import webbrowser
from pathlib import Path
from typing import Tuple

from ..paths import expand_path

# A scan's page, then `erasure-fast paper`'s (all analyses, then one analysis's)
REPORT_PAGES = ("report.html", "paper_report.html", "paper_*.html")


def find_report(path) -> str:
    """The report page ``path`` names: an .html file itself, or in a folder the first of
    `REPORT_PAGES` there. Raises ValueError (one line) when there is none."""
    where = expand_path(path)
    if os.path.isfile(where) and where.endswith(".html"):
        return os.path.abspath(where)
    if not os.path.isdir(where):
        raise ValueError(f"{path}: no such folder or .html file (give a scan's --out folder)")
    for pattern in REPORT_PAGES:
        found = sorted(glob.glob(os.path.join(glob.escape(where), pattern)))
        if found:
            return os.path.abspath(found[0])
    raise ValueError(f"{path}: holds no report.html (a scan writes it into its --out when it finishes; rerunning a "
                     "finished scan writes it again)")


def can_open_browser() -> bool:
    """Whether a graphical browser can be shown: $BROWSER is set, or there is a display (macOS and
    Windows always have one). Without one, Python's webbrowser would run a text browser in the
    terminal, which cannot run the report's script."""
    env = os.environ
    return bool(env.get("BROWSER") or env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or sys.platform in ("darwin", "win32"))


def view(path) -> Tuple[str, bool]:
    """(file:// URL of the report page of ``path``, whether a browser was opened on it)."""
    url = Path(find_report(path)).as_uri()
    return url, can_open_browser() and webbrowser.open(url)
