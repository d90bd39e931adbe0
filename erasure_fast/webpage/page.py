"""One HTML file that works offline: its styles and scripts inlined, its data embedded as JSON, its
images as data: URIs, and a Content-Security-Policy that forbids every fetch (no script, style, image,
font or connection from anywhere else), so the page can be mailed or attached to a paper and cannot
leak what it shows. `markdown_page` renders the small markdown subset the package's reports use."""

from __future__ import annotations

import base64
import html
import json
import os
import re
from typing import Iterable, Optional

from ..paths import atomic_write

_HERE = os.path.dirname(os.path.abspath(__file__))
# Inline styles and scripts only, images only as data: URIs, nothing fetched.
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
_IMAGE_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def asset(name: str) -> str:
    """The text of a file shipped beside this module (a stylesheet or script)."""
    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
        return f.read()


def json_for_script(data) -> str:
    """``data`` as JSON that can sit inside a <script> element: no NaN (invalid JSON), and every "<"
    escaped, so no string in it (a token's text, a file name) can close the element."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False).replace("<", "\\u003c")


def page(title: str, body: str, *, data=None, scripts: Iterable[str] = (), styles: Iterable[str] = ()) -> str:
    """A complete HTML document: ``body`` (HTML), the base stylesheet and ``styles``, ``data`` as JSON
    in <script id="report-data" type="application/json"> (read by the scripts), then ``scripts``."""
    css = "\n".join([asset("base.css"), *styles])
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{css}\n</style></head>",
        f"<body>\n{body}",
    ]
    if data is not None:
        parts.append(f'<script id="report-data" type="application/json">{json_for_script(data)}</script>')
    parts += [f"<script>\n{js}\n</script>" for js in scripts]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_page(path: str, text: str) -> str:
    """Write a page atomically (`erasure_fast.paths.atomic_write`); returns ``path``."""
    def write(temp):
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def _image(src: str, alt: str, folder: str) -> str:
    path = os.path.join(folder, src)
    kind = _IMAGE_TYPES.get(os.path.splitext(src)[1].lower())
    if kind is None or "://" in src or not os.path.isfile(path):
        return f'<span class="missing">[{html.escape(alt)}: {html.escape(src)} not found]</span>'
    with open(path, "rb") as f:
        encoded = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{kind};base64,{encoded}">'


def _inline(text: str, folder: str) -> str:
    """Escaped text with `code`, **bold** and images ![alt](file) (inlined from ``folder``)."""
    out, last = [], 0
    for m in re.finditer(r"!\[([^\]]*)\]\(([^)\s]+)\)|`([^`]+)`|\*\*(.+?)\*\*", text):
        out.append(html.escape(text[last:m.start()]))
        if m.group(2) is not None:
            out.append(_image(m.group(2), m.group(1), folder))
        elif m.group(3) is not None:
            out.append(f"<code>{html.escape(m.group(3))}</code>")
        else:
            out.append(f"<strong>{html.escape(m.group(4))}</strong>")
        last = m.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def _cells(line: str):
    """The cells of a markdown table row (a backslash-escaped pipe stays in its cell)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def markdown_html(markdown: str, folder: str) -> str:
    """HTML for the markdown subset the reports use: headings, paragraphs, "- " lists, "> " quotes,
    pipe tables and inline code / bold / images (files in ``folder``, inlined)."""
    lines = markdown.splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2), folder)}</h{level}>")
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            head = "".join(f"<th>{_inline(c, folder)}</th>" for c in _cells(line))
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append("<tr>" + "".join(f"<td>{_inline(c, folder)}</td>" for c in _cells(lines[i])) + "</tr>")
                i += 1
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        else:
            for prefix, tag, item in (("- ", "ul", "li"), ("> ", "blockquote", "p")):
                if line.startswith(prefix):
                    items = []
                    while i < len(lines) and lines[i].startswith(prefix):
                        items.append(f"<{item}>{_inline(lines[i][len(prefix):], folder)}</{item}>")
                        i += 1
                    out.append(f"<{tag}>{''.join(items)}</{tag}>")
                    break
            else:
                para = []
                while i < len(lines) and lines[i].strip() and not re.match(r"#|\||- |> ", lines[i]):
                    para.append(lines[i])
                    i += 1
                out.append(f"<p>{_inline(' '.join(para), folder)}</p>")
    return "\n".join(out)


def markdown_page(markdown: str, folder: str, title: Optional[str] = None) -> str:
    """A self-contained page of a markdown report whose images lie in ``folder`` (`markdown_html`);
    the title is the first heading's unless given."""
    if title is None:
        m = re.search(r"^#\s+(.*)$", markdown, flags=re.M)
        title = m.group(1) if m else "report"
    return page(title, f'<main class="doc">\n{markdown_html(markdown, folder)}\n</main>')
