"""Scans: aggregation against direct computation, exact resume, config checks, corpora, report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import erasure_fast as ef
from erasure_fast.scanning import CorpusError, ScanJob, ScanOptions, open_corpus, plan_scan, scan
from erasure_fast.scanning import checkpoint as ckpt
from erasure_fast.scanning.aggregate import SeriesStats, TopK
from conftest import build_model

SMALL = dict(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64)


@pytest.fixture(scope="module")
def model():
    return build_model(**SMALL, seed=7)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A 1-D uint16 token stream of 23 rows x 16 tokens (+5 leftover tokens), saved as .npy."""
    path = tmp_path_factory.mktemp("corpus") / "tokens.npy"
    rng = np.random.default_rng(3)
    np.save(path, rng.integers(0, SMALL["d_vocab"], size=23 * 16 + 5).astype(np.uint16))
    return str(path)


def run(model, corpus, out, **kw):
    """A scan on the default backend (cpp on this CPU), as a user would run it."""
    kw.setdefault("seq_len", 16)
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    return scan(model, corpus, out_dir=str(out), **kw)


def run_stopped(model, corpus, out, batches: int, **kw):
    """A scan that stops (checkpoint saved) after ``batches`` batches, as a killed or interrupted one."""
    kw.setdefault("seq_len", 16)
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    with ScanJob(plan_scan(model, corpus, out_dir=str(out), **kw)) as job:
        assert job.run(max_batches=batches) is False


def final_state(out):
    arrays, meta = ckpt.load(os.path.join(str(out), "checkpoint", "rank0-of-1.npz"))
    return arrays, meta


def test_scan_aggregates_equal_direct_attribution(model, stream, tmp_path):
    res = run(model, stream, tmp_path / "a", writers=["L0H1", "L1H2"], prepend_bos=0)
    assert res.meta["backend"] == "cpp"  # the default backend on a CPU
    toks = torch.from_numpy(np.load(stream)[: 23 * 16].astype(np.int64).reshape(23, 16))
    toks = torch.cat([torch.zeros(23, 1, dtype=torch.long), toks[:, :-1]], dim=1)
    # the reference: the torch backend's direct attribution of the same rows (fp32: cpp agrees to ~1e-6)
    direct = ef.attribute(model, toks, writers=["L0H1", "L1H2"], backend="torch")
    s = res.summary
    assert res.meta["tokens"] == 23 * 16 and res.meta["rows"] == 23
    pr = direct.pr.double().reshape(-1, *direct.pr.shape[2:]).numpy()
    for i, node in enumerate(direct.node_labels):
        for w, writer in enumerate(direct.writer_labels):
            row = s[(s.kind == "node") & (s.node == node) & (s.writer == writer)].iloc[0]
            v = pr[:, i, w]
            assert row["count"] == np.isfinite(v).sum()
            assert row["mean"] == pytest.approx(np.nanmean(v), rel=1e-5, abs=1e-6)
            inside = v[(v > -3) & (v < 3)]
            if len(inside) == len(v):  # quantile error is at most one bin (0.005)
                assert abs(row["median"] - np.median(v)) <= 0.005 + 1e-5
    rpr = direct.resid_pr.double().reshape(-1, *direct.resid_pr.shape[2:]).numpy()
    r = s[(s.kind == "resid") & (s.node == "resid_post1") & (s.writer == "L0H1")].iloc[0]
    assert r["mean"] == pytest.approx(np.nanmean(rpr[:, -1, 0]), rel=1e-5, abs=1e-6)
    d = s[(s.kind == "dla") & (s.node == "L1H0")].iloc[0]
    dla = direct.dla[:, :, 1, 0].double().numpy()
    assert d["count"] == np.isfinite(dla).sum() == 23 * 15 and d["nan"] == 23
    assert d["mean"] == pytest.approx(np.nanmean(dla), rel=1e-5, abs=1e-6)
    # BOS split: position 0 alone
    bos = s[(s.kind == "node") & (s.node == "L1H0") & (s.writer == "L0H1")].iloc[0]["median_bos"]
    assert abs(bos - np.median(direct.pr[:, 0, 3, 0].double().numpy())) <= 0.005 + 1e-5


@pytest.mark.parametrize("kill_after", [1, 2, 5])
def test_resume_is_bit_identical(model, stream, tmp_path, kill_after):
    full = run(model, stream, tmp_path / "full", checkpoint_every=2)
    ref_arrays, ref_meta = final_state(tmp_path / "full")
    out = tmp_path / "killed"
    run_stopped(model, stream, out, kill_after, checkpoint_every=2)
    _, meta = final_state(out)
    assert meta["next_batch"] == kill_after
    resumed = run(model, stream, out, checkpoint_every=2)
    arrays, meta = final_state(out)
    assert meta["tokens"] == ref_meta["tokens"]
    assert arrays.keys() == ref_arrays.keys()
    for k in ref_arrays:
        np.testing.assert_array_equal(arrays[k], ref_arrays[k], err_msg=k)
    cols = [c for c in full.summary.columns if c not in ("node", "writer", "kind", "downstream")]
    np.testing.assert_array_equal(resumed.summary[cols].to_numpy(), full.summary[cols].to_numpy())


def test_changed_config_refuses_to_resume(model, stream, tmp_path):
    run_stopped(model, stream, tmp_path, 1, writers=["L0H0"])
    with pytest.raises(ValueError, match="different configuration.*writers"):
        run(model, stream, tmp_path, writers=["L0H1"])
    with pytest.raises(ValueError, match="different configuration.*batch_size"):
        run(model, stream, tmp_path, writers=["L0H0"], batch_size=3)
    other = build_model(**SMALL, seed=8)
    with pytest.raises(ValueError, match="different configuration.*model_fingerprint"):
        run(other, stream, tmp_path, writers=["L0H0"])
    assert run(model, stream, tmp_path, writers=["L0H1"], resume=False) is not None


def test_max_tokens_and_progress_free_rerun(model, stream, tmp_path):
    res = run(model, stream, tmp_path, max_tokens=100)  # 6 whole rows of 16
    assert res.meta["tokens"] == 96 and res.meta["rows"] == 6
    res2 = run(model, stream, tmp_path, max_tokens=100)  # already complete: nothing recomputed
    assert res2.meta["tokens"] == 96


def test_report_files(model, stream, tmp_path):
    res = run(model, stream, tmp_path, notes="synthetic test model")
    for name in ("summary.parquet", "summary.csv", "summary.json", "report.md", "report.html", "fig1_resid_pr.png",
                 "fig2_node_pr.png", "heatmap_pr.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    import pandas as pd

    back = pd.read_parquet(tmp_path / "summary.parquet")
    assert len(back) == len(res.summary) == (8 + 5) * 6 + 6 + 6
    meta = json.load(open(tmp_path / "summary.json"))["meta"]
    assert meta["tokens"] == 23 * 16 and meta["tokens_per_s"] > 0 and meta["backend"] == "cpp"
    md = open(tmp_path / "report.md").read()
    assert "synthetic test model" in md and "Strongest erasure" in md and "fig2_node_pr.png" in md


def test_series_stats_quantiles_and_overflow():
    rng = np.random.default_rng(0)
    v = rng.normal(0, 0.7, size=(5000, 3))
    v[:10, 0] = 5.0  # overflow
    v[10:20, 1] = np.nan
    st = SeriesStats(3, 2, -3.0, 3.0, 600)
    bucket = torch.from_numpy((np.arange(5000) % 2).astype(np.int64))
    for lo in range(0, 5000, 1234):  # several batches
        st.update(torch.from_numpy(v[lo:lo + 1234]), bucket[lo:lo + 1234])
    s = st.summary()
    assert s["overflow"][0] == 10 and s["nan"][1] == 10 and s["count"][1] == 4990
    for q in (0.125, 0.25, 0.5, 0.75, 0.875):
        ref = np.nanquantile(v, q, axis=0)
        assert np.all(np.abs(s[f"q{q:g}"] - ref) <= st.bin_width + 1e-12), q
    assert np.allclose(s["mean"], np.nanmean(v, axis=0)) and np.allclose(s["std"], np.nanstd(v, axis=0, ddof=1))
    odd = st.summary([1])
    assert odd["count"][2] == 2500


def test_topk_is_independent_of_batching():
    rng = np.random.default_rng(1)
    score = torch.from_numpy(rng.normal(size=(300, 2)))
    score[5] = score[6]  # ties are broken by (row, pos)
    rows = torch.arange(300) // 10
    pos = torch.arange(300) % 10
    pay = torch.from_numpy(rng.normal(size=(300, 2, 3)))
    one = TopK(2, 7, payload=3)
    one.update(score, rows, pos, pay)
    parts = [TopK(2, 7, payload=3) for _ in range(3)]
    for i, p in enumerate(parts):
        sl = slice(i * 100, (i + 1) * 100)
        p.update(score[sl], rows[sl], pos[sl], pay[sl])
    merged = parts[2]
    merged.merge(parts[0])
    merged.merge(parts[1])
    for k in ("score", "row", "pos", "payload"):
        np.testing.assert_array_equal(getattr(one, k), getattr(merged, k))
    ref = np.sort(score.numpy()[:, 0])[::-1][:7]
    np.testing.assert_array_equal(one.score[0], ref)


def test_corpus_errors(tmp_path, model):
    bad = tmp_path / "odd.bin"
    bad.write_bytes(b"\x01\x00\x02")
    with pytest.raises(CorpusError, match="odd.bin: size 3 bytes is not a multiple of 2.*offset 2"):
        open_corpus(str(bad), seq_len=4, bin_dtype="uint16")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match="empty.bin: file is empty"):
        open_corpus(str(empty), seq_len=4, bin_dtype="uint16")
    np.save(tmp_path / "f.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(CorpusError, match="f.npy: token array dtype float32 not supported"):
        open_corpus(str(tmp_path / "f.npy"), seq_len=4)
    np.save(tmp_path / "s.npy", np.zeros(10, dtype=np.int32))
    with pytest.raises(CorpusError, match=r"seq_len is needed to cut the 1-D token stream .*s.npy into rows"):
        open_corpus(str(tmp_path / "s.npy"))
    (tmp_path / "trunc.npy").write_bytes(open(tmp_path / "s.npy", "rb").read()[:-8])
    with pytest.raises(CorpusError, match="trunc.npy: not a readable .npy"):
        open_corpus(str(tmp_path / "trunc.npy"), seq_len=4)
    with pytest.raises(CorpusError, match="unknown corpus format"):
        (tmp_path / "x.csv").write_text("1,2")
        open_corpus(str(tmp_path / "x.csv"))


def test_bin_corpus_needs_its_dtype(tmp_path, model):
    """A raw .bin has no header: read with a guessed uint16, int32 ids would scan as garbage (twice
    the tokens, every second id 0). The dtype must be named."""
    (np.arange(64, dtype=np.int32) % 50).tofile(tmp_path / "ids32.bin")
    with pytest.raises(CorpusError, match=r"ids32.bin: a raw .bin token file has no header; pass its dtype"):
        open_corpus(str(tmp_path / "ids32.bin"), seq_len=8)
    with pytest.raises(CorpusError, match="no header"):
        run(model, str(tmp_path / "ids32.bin"), tmp_path / "o", seq_len=8)
    assert not os.path.exists(tmp_path / "o" / "checkpoint")
    with pytest.raises(CorpusError, match="bin_dtype must be one of"):
        open_corpus(str(tmp_path / "ids32.bin"), seq_len=8, bin_dtype="float32")
    c = open_corpus(str(tmp_path / "ids32.bin"), seq_len=8, bin_dtype="int32")
    assert c.n_rows == 8 and c.describe()["dtype"] == "int32"


@pytest.mark.parametrize("name, match", [
    ("missing.npy", "missing.npy: no such file"),
    ("missing.bin", "missing.bin: no such file"),
    ("missing.txt", "missing.txt: no such file"),
    ("missing.jsonl", "missing.jsonl: no such file"),
    ("missing_dataset", r"missing_dataset: no such file or directory \(a dataset on the Hugging Face hub is named hf:owner/name\)"),
])
def test_missing_corpus_is_not_found_at_once(tmp_path, model, name, match):
    """Each kind says "no such file" at once: no 30-second hub lookup for a typo, no tokenizer error."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(CorpusError, match=match):
        open_corpus(str(tmp_path / name), seq_len=8, bin_dtype="uint16", tokenizer=object())
    assert time.perf_counter() - t0 < 2
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(CorpusError, match="not a Hugging Face dataset directory"):
        open_corpus(str(tmp_path / "plain_dir"), seq_len=8)


def test_out_of_range_id_in_the_last_row_is_refused_before_any_work(tmp_path, model, monkeypatch):
    ids = (np.arange(16 * 8) % 50).astype(np.uint16)
    ids[-3] = 60  # out of range for d_vocab=50, in the last row (15) of 8 tokens
    ids.tofile(tmp_path / "ids.bin")
    import erasure_fast.scanning.job as job

    def no_forward(*a, **k):
        raise AssertionError("the model ran before the corpus was checked")

    monkeypatch.setattr(job, "run_attribution", no_forward)
    with pytest.raises(CorpusError, match=r"ids.bin: row 15 \(byte offset 240\) has token ids outside \[0, d_vocab=50\) \(e.g. 60\)"):
        run(model, str(tmp_path / "ids.bin"), tmp_path / "o", seq_len=8, batch_size=2, bin_dtype="uint16")
    assert not os.path.exists(tmp_path / "o" / "checkpoint")
    # max_tokens that stops before the bad row scans fine
    monkeypatch.undo()
    res = run(model, str(tmp_path / "ids.bin"), tmp_path / "o", seq_len=8, batch_size=2, bin_dtype="uint16", max_tokens=8 * 15)
    assert res.meta["rows"] == 15


def test_bin_corpus_and_2d_rows(tmp_path, model):
    a = (np.arange(5 * 12) % 50).astype(np.uint32)
    a.tofile(tmp_path / "t.bin")
    c = open_corpus(str(tmp_path / "t.bin"), seq_len=12, bin_dtype="uint32")
    rows = list(c.rows())
    assert c.n_rows == 5 and len(rows) == 5 and np.array_equal(rows[2][1], a[24:36])
    assert c.dropped_tokens == 0


def test_2d_rows_longer_than_seq_len_are_cut_into_windows(tmp_path, model):
    """Stored rows of 26 tokens with seq_len 8: three windows each (not only the first 8 tokens),
    the last 2 tokens of every stored row in no window -- counted, reported."""
    a = np.arange(5 * 26).reshape(5, 26).astype(np.int64) % 50
    np.save(tmp_path / "r.npy", a)
    c = open_corpus(str(tmp_path / "r.npy"), seq_len=8)
    assert c.n_rows == 15 and c.dropped_tokens == 10
    got = dict(c.rows())
    assert np.array_equal(got[4], a[1, 8:16]) and np.array_equal(got[14], a[4, 16:24])
    assert c.byte_offset(4) == 128 + (26 + 8) * 8  # .npy header of 128 bytes
    blocks = list(c.batches(4))
    assert [len(ids) for _, ids, _ in blocks] == [4, 4, 4, 3]
    assert np.array_equal(np.concatenate([t for _, _, t in blocks]), np.stack([got[i] for i in range(15)]))
    res = run(model, str(tmp_path / "r.npy"), tmp_path / "o", seq_len=8)
    assert res.meta["rows"] == 15 and res.meta["corpus"]["dropped_tokens"] == 10
    assert "10 tokens in no whole row, not scanned" in open(tmp_path / "o" / "report.md").read()
    assert open_corpus(str(tmp_path / "r.npy")).n_rows == 5  # default seq_len: the stored rows


def test_bad_scan_arguments(model, stream, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run(model, stream, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="seq_len 100 exceeds the model's n_ctx 64"):
        run(model, stream, tmp_path, seq_len=100)
    with pytest.raises(ValueError, match="prepend_bos must be a token id"):
        run(model, stream, tmp_path, prepend_bos=50)
    with pytest.raises(ValueError, match="does not exist"):
        run(model, stream, tmp_path, writers=["L5H0"])
    with pytest.raises(ValueError, match=r"names head L0H2 twice \('L0H2' and 'L0H2'\)"):
        run(model, stream, tmp_path, writers=["L0H2", "L0H2"])
    with pytest.raises(ValueError, match="names head L0H2 twice"):
        run(model, stream, tmp_path, writers=["L0H2", (0, 2)])
    with pytest.raises(TypeError, match="checkpoint_every must be an int"):
        run(model, stream, tmp_path, checkpoint_every=1.5)
    with pytest.raises(ValueError, match="position_edges must be increasing"):
        run(model, stream, tmp_path, position_edges=(16, 1))
    assert not os.listdir(tmp_path)  # nothing written: every check ran before any work


def test_scan_options_are_one_definition(model, stream, tmp_path):
    """scan and plan_scan take the options of ScanOptions as keywords (their signatures name each, with
    its default); a mistyped one is a TypeError naming it; a ScanOptions plans the same scan."""
    import dataclasses
    import inspect

    options = {f.name: f.default for f in dataclasses.fields(ScanOptions)}
    for fn in (scan, plan_scan):
        params = inspect.signature(fn).parameters
        assert {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY} == options, fn
    for fn in (scan, plan_scan):
        with pytest.raises(TypeError, match=rf"^{fn.__name__}\(\) got an unexpected keyword argument 'top_kk' "
                                            r"\(did you mean 'top_k'\?\)$"):
            fn(model, stream, out_dir=str(tmp_path / "o"), top_kk=3)
    with pytest.raises(TypeError, match="options must be a ScanOptions"):
        plan_scan(model, stream, {"top_k": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScanOptions().top_k = 3
    assert ScanOptions(position_edges=[1, 16], batch_size=np.int64(3)).position_edges == (1, 16)
    assert not os.listdir(tmp_path)  # refused before any work
    opts = ScanOptions(seq_len=16, batch_size=4, out_dir=str(tmp_path / "p"), top_k=3, writers=["L1H2"])
    by_object, by_keywords = plan_scan(model, stream, opts), plan_scan(model, stream, **dataclasses.asdict(opts))
    assert by_object.cfg == by_keywords.cfg and by_object.cfg.top_k == 3 and by_object.cfg.writers == [5]
    assert plan_scan(model, stream, opts, top_k=4).cfg.top_k == 4  # keywords replace the object's values


def test_scan_finds_the_planted_circuit(tmp_path):
    """Ground truth: a small model with the demo's planted writer/eraser pair; the scan ranks it first."""
    from erasure_fast.demo import PLANTED, demo_corpus, planted_model
    from erasure_fast.scanning.ranking import top_pairs

    dims = dict(n_layers=4, n_heads=8, d_head=32, d_model=256, d_mlp=256, d_vocab=300, n_ctx=128)
    model, info = planted_model(seed=0, dims=dims)
    assert set(info["gains"]) == set(PLANTED["erasers"])
    corpus = demo_corpus(24, 128, dims["d_vocab"], seed=3)
    res = scan(model, corpus, batch_size=8, out_dir=str(tmp_path), prepend_bos=0, progress=False, notes=info["note"])
    top = top_pairs(res.summary, 3)
    pairs = list(zip(top.node, top.writer))
    assert pairs[0] == ("L2H3", "L0H2") and ("L2H6", "L0H2") in pairs, pairs
    assert top["median"].iloc[0] == pytest.approx(PLANTED["erasers"]["L2H3"], abs=0.15)
    assert "planted erasure circuit" in open(tmp_path / "report.md").read()


def test_hf_dataset_directory_corpus(tmp_path, model):
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed")
    rows = [list(range(i, i + 40)) for i in range(0, 10)]  # 10 docs of 40 tokens -> 2 rows of 16 each
    datasets.Dataset.from_dict({"tokens": rows}).save_to_disk(str(tmp_path / "ds"))
    c = open_corpus(str(tmp_path / "ds"), seq_len=16)
    got = list(c.rows())
    assert len(got) == 20 and np.array_equal(got[3][1], np.arange(17, 33))
    assert [i for i, _ in c.rows(18)] == [18, 19]
    with pytest.raises(CorpusError, match="no column 'ids'"):
        open_corpus(str(tmp_path / "ds"), seq_len=16, column="ids")
    res = run(model, str(tmp_path / "ds"), tmp_path / "scan", batch_size=6)
    assert res.meta["tokens"] == 20 * 16


def _word_tokenizer():
    from erasure_fast.bench.hf_capture import word_tokenizer

    return word_tokenizer(40)


def test_text_and_jsonl_corpora(tmp_path, model):
    tok = _word_tokenizer()
    docs = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(30)) for i in range(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    a = [r for _, r in open_corpus(str(tmp_path / "c.jsonl"), tokenizer=tok, seq_len=16).rows()]
    b = [r for _, r in open_corpus(str(tmp_path / "c.txt"), tokenizer=tok, seq_len=16).rows()]
    assert len(a) == len(b) == (6 * 31) // 16  # 30 words + EOS per document, packed
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0][0] == tok("w0")["input_ids"][0] and 1 in np.concatenate(a)  # EOS between documents
    (tmp_path / "bad.jsonl").write_text('{"text": "w1"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl: line 2 is not JSON \(Expecting value at column 1\)"):
        list(open_corpus(str(tmp_path / "bad.jsonl"), tokenizer=tok, seq_len=4).rows())
    with pytest.raises(CorpusError, match="need the model's tokenizer"):
        open_corpus(str(tmp_path / "c.txt"))
    res = run(model, str(tmp_path / "c.jsonl"), tmp_path / "scan", tokenizer=tok)
    assert res.meta["tokens"] == len(a) * 16


def test_pair_statistics_in_token_chunks_equal_one_pass(model, stream, tmp_path, monkeypatch):
    """A batch whose null dots exceed the chunk budget is folded in several token chunks; its ranking
    histograms and counts are the same as in one pass, moments to rounding."""
    import erasure_fast.scanning.state as state

    whole = run(model, stream, tmp_path / "whole", seq_len=64, batch_size=5, report=False)
    n_pairs = len(state.downstream_pairs(plan_scan(model, stream, out_dir=str(tmp_path / "p"), seq_len=64).cfg))
    monkeypatch.setattr(state, "PAIR_CHUNK_BYTES", 8 * n_pairs * 100)  # 256-token chunks (the floor): 2 per batch
    chunked = run(model, stream, tmp_path / "chunked", seq_len=64, batch_size=5, report=False)
    a, _ = final_state(tmp_path / "whole")
    b, _ = final_state(tmp_path / "chunked")
    assert whole.meta["tokens"] == chunked.meta["tokens"] == 5 * 64 and a.keys() == b.keys()
    for key in a:
        if key.startswith("pair.") and key.endswith((".hist", ".count", ".nan")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert a["pair.es.hist"].sum() > 0


def test_torch_reference_aggregation_equals_the_compiled_one(model, stream, tmp_path, monkeypatch):
    """The aggregation a scan on a GPU (or without the extension) runs -- the torch references of the
    PR histograms (ratios formed in torch), the ranking statistics (pair_values on pair-major null
    dots) and every other series -- gives the compiled pass's checkpoint from the same null dots: the
    same histograms and counts, moments and top examples to rounding."""
    import erasure_fast.scanning.aggregate as aggregate
    import erasure_fast.scanning.pair_stats as pair_stats

    import erasure_fast.attribution as attribution

    run(model, stream, tmp_path / "compiled", writers="all", report=False)
    monkeypatch.setattr(aggregate, "scan_kernel", lambda name, values: None)
    # the folds in torch; the null dots they fold still compiled (their float32 sums run in another
    # order than torch's products: test_aggregate_kernel checks both against float64)
    compiled_kernel = pair_stats.scan_kernel
    monkeypatch.setattr(pair_stats, "scan_kernel",
                        lambda name, values: compiled_kernel(name, values) if name == "null_dots" else None)
    monkeypatch.setattr(attribution, "reads_back_freely", lambda device: False)  # as on a GPU
    run(model, stream, tmp_path / "reference", writers="all", report=False)
    a, _ = final_state(tmp_path / "compiled")
    b, _ = final_state(tmp_path / "reference")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith((".hist", ".count", ".nan", ".row", ".pos")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert a["pr.hist"].sum() > 0 and a["pair.es_null.hist"].sum() > 0


def test_token_ids_are_checked_by_kind(tmp_path, model):
    """A dataset whose token column holds floats (321.7) was truncated to int and scanned. Every token
    input is now checked by kind: float, nested and scalar columns, float examples of a stream, float
    arrays; and every flag by its own kind."""
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed")
    datasets.Dataset.from_dict({"tokens": [[3.0, 4.7] * 10] * 3}).save_to_disk(str(tmp_path / "floats"))
    with pytest.raises(CorpusError, match=r"floats: column 'tokens' holds float64 values, not integer token ids"):
        open_corpus(str(tmp_path / "floats"), seq_len=8)
    datasets.Dataset.from_dict({"tokens": [[[1, 2]] * 10] * 3}).save_to_disk(str(tmp_path / "nested"))
    with pytest.raises(CorpusError, match=r"nested: column 'tokens' holds lists of lists per example"):
        open_corpus(str(tmp_path / "nested"), seq_len=8)
    datasets.Dataset.from_dict({"tokens": [1, 2, 3]}).save_to_disk(str(tmp_path / "scalar"))
    with pytest.raises(CorpusError, match=r"scalar: column 'tokens' holds one value per example"):
        open_corpus(str(tmp_path / "scalar"), seq_len=8)
    from erasure_fast.scanning.corpus import example_token_ids  # a streamed dataset declares no types: each example

    with pytest.raises(CorpusError, match=r"hf:x/y: column 'tokens': example 7 holds float64 values of shape \[2\] "
                                          r"\(e.g. 321.7\), not a list of integer token ids"):
        example_token_ids([321.7, 2.0], "hf:x/y: column 'tokens'", 7)
    assert example_token_ids(np.array([1, 2], np.uint16), "x", 0).dtype == np.int64
    with pytest.raises(CorpusError, match=r"column is only for Hugging Face datasets; .*s.npy is a .npy token array"):
        np.save(tmp_path / "s.npy", np.arange(64, dtype=np.int64) % 50)
        open_corpus(str(tmp_path / "s.npy"), seq_len=8, column="tokens")
    with pytest.raises(CorpusError, match=r"bin_dtype is only for raw .bin token files; <array> is a token array"):
        open_corpus(np.arange(64) % 50, seq_len=8, bin_dtype="int64")
    for name, value, kind in (("resume", "no", TypeError), ("progress", 1, TypeError), ("overwrite", None, TypeError),
                              ("batch_size", 2.0, TypeError), ("top_k", True, TypeError)):
        with pytest.raises(kind, match=rf"{name} must be"):
            run(model, str(tmp_path / "s.npy"), tmp_path / "o", seq_len=8, **{name: value})
    assert run(model, str(tmp_path / "s.npy"), tmp_path / "o", seq_len=8, batch_size=np.int64(3)).meta["rows"] == 8


def test_the_gpu_fold_reads_nothing_back_per_batch(model, stream, tmp_path, monkeypatch):
    """The aggregation a batch on a GPU runs (the torch path: histograms, counts, moments and top
    examples folded into a state kept on the batch's device) reads no value back to the host and runs
    no operation whose output size depends on the data: counted on the CPU (`host_reads`), zero in
    every batch. Only checkpoints and the summary read the state, and they give the compiled path's
    numbers (`test_torch_reference_aggregation_equals_the_compiled_one`)."""
    import erasure_fast.attribution as attribution
    import erasure_fast.scanning.aggregate as aggregate
    import erasure_fast.scanning.job as job
    import erasure_fast.scanning.pair_stats as pair_stats
    from host_reads import HostReads

    monkeypatch.setattr(aggregate, "scan_kernel", lambda name, values: None)
    monkeypatch.setattr(pair_stats, "scan_kernel", lambda name, values: None)
    monkeypatch.setattr(attribution, "reads_back_freely", lambda device: False)  # as on a GPU
    per_batch = []
    fold = job.update

    def counted_fold(*args, **kwargs):
        with HostReads() as reads:
            fold(*args, **kwargs)
        per_batch.append(dict(reads.count))

    monkeypatch.setattr(job, "update", counted_fold)
    res = run(model, stream, tmp_path / "scan", writers="all", report=False, batch_size=3)
    assert len(per_batch) == 8 and res.meta["tokens"] == 23 * 16
    assert per_batch == [{}] * 8, per_batch
    # the counter sees what it must: the compiled path hands its batches to numpy
    monkeypatch.undo()
    monkeypatch.setattr(job, "update", counted_fold)
    per_batch.clear()
    run(model, stream, tmp_path / "compiled", writers="all", report=False, batch_size=3)
    assert all(b.get("Tensor.numpy", 0) > 0 for b in per_batch), per_batch


def _as_on_a_gpu(monkeypatch) -> None:
    """Make a scan on the CPU take every path it takes on a GPU: the torch aggregation, the element-wise
    node sums and the checks deferred to checkpoints."""
    import erasure_fast.attribution as attribution
    import erasure_fast.scanning.aggregate as aggregate
    import erasure_fast.scanning.job as job
    import erasure_fast.scanning.pair_stats as pair_stats

    monkeypatch.setattr(aggregate, "scan_kernel", lambda name, values: None)
    monkeypatch.setattr(pair_stats, "scan_kernel", lambda name, values: None)
    monkeypatch.setattr(attribution, "reads_back_freely", lambda device: False)
    monkeypatch.setattr(job, "reads_back_freely", lambda device: False)


def test_a_scan_batch_on_the_gpu_path_reads_nothing_back(model, stream, tmp_path, monkeypatch):
    """A whole batch of a scan taking a GPU's paths -- capture, validation (its checks deferred to the
    checkpoint), the attribution, the aggregation -- reads no value back to the host and runs no
    operation whose output size depends on the data (counted on the CPU, `host_reads`); the
    writers' list, which lives on the host, may be read. The torch backend, which runs on a GPU (the
    Triton one cannot run here but in its interpreter, which computes on the host). The scan's results
    are the CPU path's."""
    import erasure_fast.scanning.job as job
    from host_reads import HostReads

    _as_on_a_gpu(monkeypatch)
    per_batch = []
    scan_batch = job.ScanJob._scan_batch

    def counted(self, *args):
        with HostReads(host=[self.plan.wr]) as reads:
            scan_batch(self, *args)
        per_batch.append(dict(reads.count))

    monkeypatch.setattr(job.ScanJob, "_scan_batch", counted)
    res = run(model, stream, tmp_path / "gpu-path", writers="all", report=False, backend="torch")
    assert len(per_batch) == 6 and per_batch == [{}] * 6, per_batch
    monkeypatch.undo()
    # the CPU path's folds, from the null dots the GPU path forms (torch's products: the compiled
    # ones sum in another order, test_aggregate_kernel checks both against float64)
    import erasure_fast.scanning.pair_stats as pair_stats

    compiled_kernel = pair_stats.scan_kernel
    monkeypatch.setattr(pair_stats, "scan_kernel",
                        lambda name, values: None if name == "null_dots" else compiled_kernel(name, values))
    ref = run(model, stream, tmp_path / "cpu-path", writers="all", report=False, backend="torch")
    a, b = final_state(tmp_path / "gpu-path")[0], final_state(tmp_path / "cpu-path")[0]
    for key in a:
        if key.endswith((".hist", ".count", ".nan", ".row", ".pos")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert res.meta["tokens"] == ref.meta["tokens"] == 23 * 16


def test_a_bad_batch_on_the_gpu_path_is_refused_at_the_checkpoint(model, stream, tmp_path, monkeypatch):
    """With its checks deferred (a GPU's path), a batch whose activations are not finite is named at
    the next checkpoint, and the aggregates that hold it are not saved: the checkpoint on disk keeps
    the batches before it, and the scan resumes from there once the cause is gone."""
    import erasure_fast.scanning.job as job

    _as_on_a_gpu(monkeypatch)
    run_stopped(model, stream, tmp_path / "scan", 2, checkpoint_every=2, backend="torch")
    saved = final_state(tmp_path / "scan")[0]
    original = job.run_attribution
    capture = job.ScanJob._scan_batch

    def bad_z(self, b, row_ids, toks):
        if b == 3:  # NaN activations in batch 3: poison the model's output of that batch only
            monkeypatch.setattr(job, "run_attribution", lambda *a, **k: original(*a, **{**k, "scale_override": torch.full(
                (toks.shape[0], toks.shape[1]), float("nan"))}))
        else:
            monkeypatch.setattr(job, "run_attribution", original)
        capture(self, b, row_ids, toks)

    monkeypatch.setattr(job.ScanJob, "_scan_batch", bad_z)
    with pytest.raises(ValueError, match=r"batch 3 \(corpus rows 12-15\): scale must be finite and > 0 at every "
                                         r"token.*not saved \(the checkpoint in .* keeps the 128 tokens before it\)"):
        run(model, stream, tmp_path / "scan", checkpoint_every=2, backend="torch")
    after = final_state(tmp_path / "scan")[0]
    for key in saved:
        np.testing.assert_array_equal(saved[key], after[key], err_msg=key)
    monkeypatch.setattr(job.ScanJob, "_scan_batch", capture)  # the cause gone
    monkeypatch.setattr(job, "run_attribution", original)
    run(model, stream, tmp_path / "scan", checkpoint_every=2, backend="torch")
    run(model, stream, tmp_path / "straight", checkpoint_every=2, backend="torch")
    a, b = final_state(tmp_path / "scan")[0], final_state(tmp_path / "straight")[0]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_gpu_fold_resumes_exactly(model, stream, tmp_path, monkeypatch):
    """A scan folded on the torch path (a GPU's), stopped after 3 batches and resumed, ends with the
    checkpoint of the same scan run straight: the state on the device is saved and reloaded whole."""
    import erasure_fast.scanning.aggregate as aggregate
    import erasure_fast.scanning.pair_stats as pair_stats

    monkeypatch.setattr(aggregate, "scan_kernel", lambda name, values: None)
    monkeypatch.setattr(pair_stats, "scan_kernel", lambda name, values: None)
    run(model, stream, tmp_path / "straight", writers="all", report=False, checkpoint_every=2)
    run_stopped(model, stream, tmp_path / "resumed", 3, writers="all", checkpoint_every=2)
    run(model, stream, tmp_path / "resumed", writers="all", report=False, checkpoint_every=2)
    a, meta_a = final_state(tmp_path / "straight")
    b, meta_b = final_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and meta_a["tokens"] == meta_b["tokens"] == 23 * 16
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
