"""Screenshots of every view of a scan's report.html, for the docs (docs/report/*.png, shown in docs/scans.md).

    python tools/report_screenshots.py demo_out docs/report

Drives headless Chromium (tools/browser.py) over the page as the browser test does; fails when the
page logs an error or requests anything but itself.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from browser import Browser  # noqa: E402

# (file name, the view's address, what shows it is drawn)
VIEWS = [
    ("pairs.png", "#pairs", "#pairs-table tbody tr"),
    ("heatmap.png", "#heatmap", "#heatmap rect.cell"),
    ("pair.png", "#pair/L2H6/L0H2", "#dists svg.hist"),
    ("resid.png", "#resid/L0H2", "#resid-chart"),
    ("examples.png", "#examples/L0H2", "table.examples .context"),
    ("run.png", "#run", "#run-meta"),
]


def main(scan_dir: str, out_dir: str) -> None:
    report = Path(scan_dir, "report.html").resolve()
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile, Browser(profile) as browser:
        page = browser.page(width=1280, height=860)
        page.goto(report.as_uri())
        for name, address, ready in VIEWS:
            page.evaluate(f"location.hash = '{address}'")
            page.wait_for(f"document.querySelector({ready!r})")
            # the first view with the page's header (model, corpus, notes), the others from their own top
            page.evaluate("window.scrollTo(0, 0)" if address == "#pairs" else "document.querySelector('main').scrollIntoView()")
            print(page.screenshot(os.path.join(out_dir, name)))
        browser.pump(0.3)
        problems = page.errors() + [url for url in page.requests() if url != report.as_uri()]
        if problems:
            raise SystemExit(f"the page logged errors or made requests: {problems}")


if __name__ == "__main__":
    main(*sys.argv[1:])
