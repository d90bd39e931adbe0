"""report.html in a real browser, used as a person would: `erasure-fast demo` writes the report, a
headless Chromium (Debian's, driven over the DevTools protocol by tools/browser.py) loads it from
file://, and the test reads, clicks and sorts as a reader does. Without Chromium the test fails,
saying how to install it (`make test` installs it).

Checked: no console error or uncaught exception and no request but the file itself; the planted
pairs first in the ranked table, in the order the scan ranked them; a click on a heatmap cell opens
that pair, whose distribution by position matches the scan's numbers; sorting by another statistic
reorders the table as the scan's own ranking by that statistic does; the filters; a top example's
token context, its position highlighted, is the corpus's tokens."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import load_tool, run_cli
from erasure_fast.demo import PLANTED, demo_corpus
from erasure_fast.scanning.ranking import rank_pairs

DEMO_TOKENS = 16384  # 16 of the demo's 64 rows: its planted pairs rank first already


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    proc = run_cli("demo", "--out", out, "--no-progress", "--max-tokens", DEMO_TOKENS, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    tool = load_tool("browser")
    try:
        binary = tool.find_chromium()
    except RuntimeError as e:
        pytest.fail(f"the browser test needs Chromium: {e}", pytrace=False)
    with tool.Browser(str(tmp_path_factory.mktemp("profile")), binary=binary) as b:
        yield b


@pytest.fixture(scope="module")
def page(browser, demo):
    page = browser.page(width=1400, height=900)
    page.goto((demo / "report.html").resolve().as_uri())
    page.wait_for("document.querySelector('#pairs-table tbody tr') !== null")
    return page


def table_pairs(page, n=None):
    rows = page.evaluate("[...document.querySelectorAll('#pairs-table tbody tr')].map(r => [r.dataset.node, r.dataset.writer])")
    return [tuple(r) for r in rows][:n]


def go(page, hash_, ready):
    page.evaluate(f"location.hash = {json.dumps(hash_)}")
    page.wait_for(ready)


def test_the_page_loads_offline_without_errors(page, demo):
    assert page.evaluate("document.querySelector('main').dataset.view") == "pairs"
    for view, ready in (("#heatmap", "document.querySelector('#heatmap')"), ("#pair", "document.querySelector('#pair-title')"),
                        ("#resid", "document.querySelector('#resid-chart')"), ("#examples", "document.querySelector('.context')"),
                        ("#run", "document.querySelector('#run-meta')"), ("#pairs", "document.querySelector('#pairs-table')")):
        go(page, view, ready)
    page.browser.pump(0.3)
    assert page.errors() == []
    assert page.requests() == [(demo / "report.html").resolve().as_uri()]  # the file itself, nothing else
    assert (demo / "report.html").stat().st_size < 5 * 2**20


def test_the_planted_pairs_come_first_as_the_scan_ranked_them(page, demo):
    summary = pd.read_parquet(demo / "summary.parquet")
    planted = [(eraser, PLANTED["writer"]) for eraser in PLANTED["erasers"]]
    scanned = list(zip(*(rank_pairs(summary, "es")[c] for c in ("node", "writer"))))
    assert sorted(table_pairs(page, 2)) == sorted(planted)
    assert table_pairs(page, 20) == scanned[:20]
    shown = page.evaluate("document.querySelector('#pairs-table tbody tr td:nth-child(4)').textContent")
    assert float(shown.replace("\u2212", "-")) == pytest.approx(summary.set_index(["node", "writer"]).loc[scanned[0], "es_median"], abs=1e-4)


def test_a_click_on_a_heatmap_cell_opens_that_pair(page, demo):
    go(page, "#heatmap", "document.querySelector('#heatmap rect.cell')")
    page.click("#heatmap rect.cell[data-node='L2H6'][data-writer='L0H2']")
    page.wait_for("document.querySelector('#pair-title') && document.querySelector('#pair-title').textContent === 'L2H6 onto L0H2'")
    assert page.evaluate("location.hash") == "#pair/L2H6/L0H2"
    # its ES by position: one histogram per bucket, and the quantile table of the scan's numbers
    assert page.evaluate("document.querySelectorAll('#dists svg.hist').length") == 4
    table = page.evaluate("[...document.querySelectorAll('#quantiles tbody tr')].map(r => [...r.cells].map(c => c.textContent))")
    row = pd.read_parquet(demo / "summary.parquet").set_index(["node", "writer"]).loc[("L2H6", "L0H2")]
    number = lambda text: float(text.replace("\u2212", "-").replace(",", ""))  # noqa: E731
    by_name = {r[0]: r for r in table}
    assert number(by_name["all positions"][1]) == row["count"]
    assert number(by_name["all positions"][5]) == pytest.approx(row["es_median"], abs=1e-4)
    assert number(by_name["BOS (0)"][5]) == pytest.approx(row["es_median_bos"], abs=1e-4)
    assert number(by_name["all but BOS"][5]) == pytest.approx(row["es_median_rest"], abs=1e-4)
    assert number(by_name["BOS (0)"][1]) == DEMO_TOKENS // 1024  # one BOS per row


def test_sorting_by_another_statistic_changes_the_order(page, demo):
    go(page, "#pairs", "document.querySelector('#pairs-table')")
    before = table_pairs(page, 20)
    page.click("#pairs-table th[data-key='median:pr']")
    page.wait_for("document.querySelector(\"#pairs-table th[data-key='median:pr']\").classList.contains('sorted')")
    after = table_pairs(page, 20)
    summary = pd.read_parquet(demo / "summary.parquet")
    assert after != before
    assert after == list(zip(*(rank_pairs(summary, "pr")[c] for c in ("node", "writer"))))[:20]
    page.click("#pairs-table th[data-key='median:pr']")  # again: the other way round
    page.wait_for("document.querySelector(\"#pairs-table th[data-key='median:pr']\").textContent.includes('\u25bc')")
    assert table_pairs(page, 1) != after[:1]
    page.click("#pairs-table th[data-key='median:es']")  # back to the scan's ranking
    page.wait_for("document.querySelector(\"#pairs-table th[data-key='median:es']\").classList.contains('sorted')")
    assert table_pairs(page, 20) == before


def test_the_filters_show_what_they_say(page, demo):
    go(page, "#pairs", "document.querySelector('#pairs-table')")
    page.click("#filter-above")
    page.wait_for("document.querySelector('#filter-above').checked")
    above = rank_pairs(pd.read_parquet(demo / "summary.parquet"), "es")
    assert table_pairs(page) == list(zip(*(above[above.above_null][c] for c in ("node", "writer"))))
    page.click("#filter-above")
    page.wait_for("!document.querySelector('#filter-above').checked")
    page.select("#filter-writer", "L0H2")
    page.wait_for("document.querySelector('#filter-writer').value === 'L0H2'")
    of_writer = above[above.writer == "L0H2"]
    assert table_pairs(page) == list(zip(of_writer.node, of_writer.writer))
    page.select("#filter-writer", "")
    page.wait_for("document.querySelector('#filter-writer').value === ''")


def test_a_top_example_shows_its_token_context(page, demo):
    go(page, "#examples/L0H2", "document.querySelector('table.examples .context')")
    shown = page.evaluate("""(() => {
        const row = document.querySelector('table.examples tbody tr');
        const toks = [...row.querySelectorAll('.context .tok')];
        return {row: +row.cells[1].textContent, pos: +row.cells[2].textContent, ids: toks.map(t => t.textContent),
                here: toks.findIndex(t => t.classList.contains('here')), target: toks.findIndex(t => t.classList.contains('target'))};
    })()""")
    example = json.loads((demo / "summary.json").read_text())["top_examples_by_writer"]["L0H2"]["strongest_erasure"][0]
    assert (shown["row"], shown["pos"]) == (example["row"], example["pos"])
    tokens = demo_corpus(64, 1024)[example["row"]].astype(np.int64)
    tokens = np.concatenate([[PLANTED["bos"]], tokens[:-1]])  # as the model read the row: BOS first
    first = example["pos"] - shown["here"]
    assert [int(t) for t in shown["ids"]] == tokens[first:first + len(shown["ids"])].tolist()
    assert shown["target"] == shown["here"] + 1 and shown["here"] == min(example["pos"], 24)
    assert page.evaluate("getComputedStyle(document.querySelector('.context .tok.here')).backgroundColor") != "rgba(0, 0, 0, 0)"


def test_the_run_view_names_the_model_corpus_and_versions(page, demo):
    go(page, "#run", "document.querySelector('#run-meta')")
    text = page.evaluate("document.querySelector('#run-meta').textContent")
    meta = json.loads((demo / "summary.json").read_text())["meta"]
    for value in (meta["model"], meta["corpus"]["content_hash"], meta["backend"], meta["capture"], meta["versions"]["torch"],
                  f"{meta['tokens']:,}"):
        assert str(value) in text, value
    assert page.errors() == []
