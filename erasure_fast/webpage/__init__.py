"""Self-contained HTML pages (`page`): styles, scripts, data and images inlined in one file, under a
Content-Security-Policy that allows no network request. A scan's report.html (scanning/report_html.py)
and the paper's report page (`markdown_page`) are made with it."""

from .page import asset, json_for_script, markdown_page, page, write_page

__all__ = ["asset", "json_for_script", "markdown_page", "page", "write_page"]
