"""The scan's report beyond its ranking, without a browser (test_report_browser.py drives one): the
page embeds the scan's own numbers -- each statistic by position bucket against a direct computation,
the ranking and its null per statistic, every writer's top examples with the corpus's tokens around
them (decoded where there is a tokenizer) -- and nothing it could fetch; report.md lists each statistic
once, features the erased writers from where they write, and shows the examples' contexts; a head's
PR onto itself is 1; `erasure-fast paper` writes its report as one page too."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import erasure_fast as ef
from erasure_fast.demo import demo_corpus, planted_model
from erasure_fast.scanning import scan
from erasure_fast.scanning.plan import CONTEXT_BEFORE
from erasure_fast.scanning.plots import written
from erasure_fast.scanning.ranking import RANK_STATISTICS, featured_writers, rank_pairs
from conftest import build_model

DIMS = dict(n_layers=4, n_heads=8, d_head=32, d_model=256, d_mlp=256, d_vocab=300, n_ctx=128)
ROWS, SEQ = 24, 128
PAIRS = [("L2H3", "L0H2"), ("L1H0", "L0H4"), ("MLP3", "L1H5")]  # a planted eraser, a random head, an MLP


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A scan of the planted small model over 24 rows of 128 tokens (BOS prepended), every writer."""
    model, info = planted_model(seed=0, dims=DIMS)
    corpus = demo_corpus(ROWS, SEQ, DIMS["d_vocab"], seed=3)
    out = tmp_path_factory.mktemp("planted")
    res = scan(model, corpus, batch_size=8, out_dir=str(out), prepend_bos=0, progress=False, top_k=7, notes=info["note"])
    return model, corpus, out, res


def page_data(path) -> dict:
    text = open(path, encoding="utf-8").read()
    return json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', text, re.S).group(1))


def test_the_page_is_one_file_that_fetches_nothing(planted):
    _, _, out, res = planted
    text = (out / "report.html").read_text()
    assert res.files["report.html"] == str(out / "report.html")
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', text).group(1)
    assert "default-src 'none'" in csp and "connect-src" not in csp  # every fetch falls under default-src
    assert [m for m in re.findall(r'\b(?:src|href)="([^"]*)"', text) if not m.startswith("data:")] == []
    scripts = re.findall(r"<script>(.*?)</script>", text, re.S)
    assert scripts and not any(re.search(r"\bfetch\(|XMLHttpRequest|WebSocket|import\(|\.src\s*=", s) for s in scripts)
    assert "</script" not in re.search(r'id="report-data"[^>]*>(.*?)</script>', text, re.S).group(1)
    assert ".erasure-fast-manifest.json" in {p.name for p in out.iterdir()}
    assert "report.html" in json.loads((out / ".erasure-fast-manifest.json").read_text())["files"]


def test_the_page_holds_the_scans_ranking_for_every_statistic(planted):
    _, _, out, res = planted
    data = page_data(out / "report.html")
    s = res.summary
    pairs = list(zip((data["nodes"][i] for i in data["pairs"]["node"]), (data["writers"][i] for i in data["pairs"]["writer"])))
    downstream = s[(s.kind == "node") & s.downstream]
    assert pairs == list(zip(downstream.node, downstream.writer))
    for by in RANK_STATISTICS:
        ranked = rank_pairs(s, by).set_index(["node", "writer"])
        medians = dict(zip(pairs, data["pairs"][by]["median"]))
        above = dict(zip(pairs, data["pairs"][by]["above"]))
        for key, row in ranked.iterrows():
            assert medians[key] == pytest.approx(row["rank_statistic"], rel=5e-5, abs=1e-12), (by, key)  # 5 digits
            assert above[key] == bool(row["above_null"]), (by, key)
        assert data["ranking"][by]["above"] == int(ranked.above_null.sum())
        assert [pairs[k] for k in data["ranking"][by]["order"]] == list(ranked.index)  # the order the page sorts by
    assert data["rank_by"] == "es" and [f["writer"] for f in data["featured"]] == ["L0H2"]


def test_each_statistic_by_position_equals_a_direct_computation(planted):
    """The ranking statistics are now kept per position bucket: the page's quantiles per bucket and its
    histograms' counts agree with the statistics computed token by token from the attribution."""
    model, corpus, out, res = planted
    data = page_data(out / "report.html")
    toks = torch.from_numpy(corpus.astype(np.int64))
    toks = torch.cat([torch.zeros(ROWS, 1, dtype=torch.long), toks[:, :-1]], dim=1)
    direct = ef.attribute(model, toks, writers="all", backend="torch")
    x = (direct.final_scale.double() * DIMS["d_model"] ** 0.5)[..., None, None]
    pv, cos, pr = direct.pv.double(), direct.cos.double().clamp(-1, 1), direct.pr.double()
    values = dict(es=pv * cos.abs() / x, apr=pr * cos.abs(), pr=pr, pv=pv, cos=cos)
    position = torch.arange(SEQ)
    buckets = [position == 0, (position >= 1) & (position < 16), (position >= 16) & (position < 128)]
    index = {p: k for k, p in enumerate(zip((data["nodes"][i] for i in data["pairs"]["node"]),
                                            (data["writers"][i] for i in data["pairs"]["writer"])))}
    row_of = {k: i for i, k in enumerate(data["dist_pairs"])}
    width = {"es": 0.0005, "apr": 0.005, "pr": 0.005, "pv": 0.1, "cos": 0.002}
    for node, writer in PAIRS:
        n, w = direct.node_labels.index(node), direct.writer_labels.index(writer)
        i = row_of[index[(node, writer)]]
        for name, v in values.items():
            d = data["dist"][name]
            for b, in_bucket in enumerate(buckets):
                got = v[:, in_bucket, n, w].reshape(-1).numpy()
                count, mean, *qs = d["q"][i][b]
                assert count == len(got), (name, b)
                assert mean == pytest.approx(got.mean(), rel=1e-4, abs=1e-6), (name, b)
                assert abs(qs[2] - np.median(got)) <= width[name] + 1e-9, (name, node, writer, b)
                assert sum(d["counts"][i][b]) + d["below"][i][b] + d["above"][i][b] == count
            everything = v[..., n, w].reshape(-1).numpy()
            assert d["q"][i][-1][0] == everything.size and abs(d["q"][i][-1][4] - np.median(everything)) <= width[name] + 1e-9
            rest = v[:, 1:, n, w].reshape(-1).numpy()
            assert abs(d["q"][i][len(buckets) + 1][4] - np.median(rest)) <= width[name] + 1e-9  # all but BOS
        row = res.summary[(res.summary.node == node) & (res.summary.writer == writer)].iloc[0]
        assert abs(row["es_median_bos"] - np.median(values["es"][:, 0, n, w].numpy())) <= width["es"] + 1e-9


def test_every_writer_keeps_its_top_examples_with_the_tokens_around_them(planted):
    _, corpus, out, res = planted
    summary = json.loads((out / "summary.json").read_text())
    by_writer = summary["top_examples_by_writer"]
    assert list(by_writer) == res.meta["writers"] and len(by_writer) == 32
    assert summary["top_examples"] == by_writer[summary["focus_writer"]] and summary["focus_writer"] == "L0H2"
    seen = np.concatenate([np.zeros((ROWS, 1), np.int64), corpus[:, :-1].astype(np.int64)], axis=1)  # BOS prepended
    for writer, kinds in by_writer.items():
        for kind, examples in kinds.items():
            assert len(examples) == 7, (writer, kind)  # top_k of each kind, for every writer
            scores = [e["score"] for e in examples]
            assert scores == sorted(scores, reverse=True)
            for e in examples:
                start = e["pos"] - e["context_at"]
                assert e["context_at"] == min(e["pos"], CONTEXT_BEFORE)
                assert e["context_ids"] == seen[e["row"], start:start + len(e["context_ids"])].tolist()
                assert len(e["context_ids"]) == min(SEQ, e["pos"] + 8) - start  # 7 tokens after, inside the row
                if kind == "strongest_erasure":
                    assert e["score"] == pytest.approx(-e["sum_downstream_pr"])
    md = (out / "report.md").read_text()
    e = by_writer["L0H2"]["strongest_erasure"][0]
    ids = e["context_ids"]
    at = e["context_at"]
    cell = " ".join(map(str, ids[:at])) + f" [{ids[at]}] \u2192 " + " ".join(map(str, ids[at + 1:]))
    assert f"| {e['row']} | {e['pos']} |" in md and cell.strip() in md


def test_contexts_are_decoded_with_the_tokenizer(tmp_path):
    from erasure_fast.bench.hf_capture import word_tokenizer

    model = build_model(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64, seed=7)
    tok = word_tokenizer(40)
    docs = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(30)) for i in range(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    res = scan(model, str(tmp_path / "c.jsonl"), out_dir=str(tmp_path / "scan"), seq_len=16, tokenizer=tok,
               progress=False, top_k=3)
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    example = summary["top_examples"]["strongest_erasure"][0]
    assert example["context_tokens"] == [tok.decode([i]) for i in example["context_ids"]]
    assert any(t.strip().startswith("w") for t in example["context_tokens"])
    vocab = page_data(tmp_path / "scan" / "report.html")["vocab"]
    assert all(vocab[str(i)] == tok.decode([i]) for i in example["context_ids"])
    md = (tmp_path / "scan" / "report.md").read_text()
    here = example["context_tokens"][example["context_at"]].replace("_", "\\_")
    assert f"[{here}]" in md and "(each token decoded on its own)" in md and res.meta["tokens"] > 0


def test_a_heads_pr_onto_itself_is_one(planted):
    """A writer's output projected onto itself is 1 at every token; with bins edged on round values
    the histogram's median said 1.0025. The bins are centred on round values now."""
    _, _, _, res = planted
    s = res.summary
    self_pr = s[(s.kind == "node") & (s.node == s.writer)]
    assert len(self_pr) == 32
    assert np.allclose(self_pr["median"], 1.0, atol=1e-9) and np.allclose(self_pr["mean"], 1.0, atol=1e-6)
    cos = s[(s.node == "L2H3") & (s.writer == "L0H2")].iloc[0]
    assert cos["cos_median"] == pytest.approx(-1.0, abs=1e-9)  # the planted eraser writes exactly -u


def test_report_md_lists_each_statistic_once_and_features_the_erased_writer(planted):
    _, _, out, res = planted
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| node | writer |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert len(cells) == len(set(cells)) and cells.count("median ES") == 1
    assert {"median APR", "median PR", "median PV", "median cos"} <= set(cells)
    featured, reason = featured_writers(res.summary)
    assert featured == [("L0H2", ["L2H3", "L2H6"])] and "above the null" in reason
    resid = md[md.index("## Residual stream PR onto the featured writers"):md.index("## Top examples")]
    assert "| point | L0H2 |" in resid and "| resid_pre0 | - |" in resid and "| resid_mid0 | " in resid
    assert "### L0H2: positions where its output is erased most" in md and "(token ids: no tokenizer)" in md


def test_fig1_plots_the_featured_writers_from_where_they_have_written(planted, monkeypatch, tmp_path):
    import erasure_fast.scanning.plots as plots

    _, _, _, res = planted
    drawn = {}
    monkeypatch.setattr(plots, "fig1_resid", lambda summary, cfg, writers, path, **kw: drawn.update(writers=writers, **kw))

    class Cfg:
        resid_labels = ["resid_pre0"] + [f"resid_{k}{l}" for l in range(4) for k in ("mid", "post")]

    plots.all_plots(str(tmp_path), res.summary, Cfg, "L0H2")
    assert drawn["writers"] == ["L0H2"] and drawn["from_writer"]
    assert drawn["labels"]["L0H2"] == "L0H2 (erased by L2H3, L2H6)" and "pairs above the null by median ES" in drawn["title"]
    assert written(Cfg.resid_labels, "L2H3").tolist() == [False] * 5 + [True] * 4
    assert written(Cfg.resid_labels, "L0H2").tolist() == [False] + [True] * 8
    assert written(["resid_pre0", "resid_post0", "resid_post1"], "L1H0").tolist() == [False, False, True]  # parallel blocks


def test_figures_mark_quantiles_beyond_the_histogram_instead_of_dropping_them(planted, monkeypatch, tmp_path):
    """A quantile or median beyond the PR histogram's range is +-inf in the summary. Figs 1 and 2 draw
    it at the range's edge with a triangle and say so; they do not turn it into a NaN whisker or band
    that matplotlib leaves out without a word (no invalid-value warning either)."""
    import warnings

    import erasure_fast.scanning.plots as plots
    from erasure_fast.scanning.plan import PR_HI, PR_LO

    _, _, _, res = planted
    summary = res.summary.copy()
    node = (summary.kind == "node") & (summary.writer == "L0H2") & summary.downstream
    resid = (summary.kind == "resid") & (summary.writer == "L0H2")
    first_node, first_resid = summary.index[node][0], summary.index[resid][-1]
    summary.loc[first_node, "q0.75"] = np.inf
    summary.loc[first_node, "q0.25"] = -np.inf
    summary.loc[first_resid, "q0.75"] = np.inf
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig) or path)

    class Cfg:
        resid_labels = ["resid_pre0"] + [f"resid_{k}{l}" for l in range(4) for k in ("mid", "post")]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.fig2_nodes(summary, Cfg, "L0H2", str(tmp_path / "f2.png"))
        plots.fig1_resid(summary, Cfg, ["L0H2"], str(tmp_path / "f1.png"))
    for fig, n_marks in zip(figs, (2, 1)):
        ax = fig.axes[0]
        assert any("beyond the histogram's range" in t.get_text() for t in ax.texts)
        marks = [(m, y) for line in ax.lines if line.get_marker() in ("^", "v")
                 for m, y in zip([line.get_marker()] * len(line.get_ydata()), line.get_ydata())]
        assert len(marks) == n_marks and all(y == (PR_HI if m == "^" else PR_LO) for m, y in marks), marks
    monkeypatch.undo()
    figs.clear()
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig) or path)
    plots.fig2_nodes(res.summary, Cfg, "L0H2", str(tmp_path / "f2.png"))  # nothing beyond: no note
    assert not figs[0].axes[0].texts


def test_the_paper_writes_its_report_as_one_page(tmp_path):
    from conftest import run_cli

    proc = run_cli("paper", "fig1", "--model", "demo", "--rows", "2", "--seq-len", "32", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "paper_fig1.html").read_text()
    assert "<h2>Fig. 1 / 2: residual stream and node PR onto L0H2</h2>" in text
    assert len(re.findall(r'<img alt="fig\d" src="data:image/png;base64,', text)) == 2
    assert [m for m in re.findall(r'\b(?:src|href)="([^"]*)"', text) if not m.startswith("data:")] == []
