"""Nothing lost or mixed: the output-folder lock, the corpus content hash on resume, a clean stop on
SIGINT, a report that survives a failing plot, a fresh scan that replaces the previous one's files,
and every check done before any work. All on the default backend (cpp on this CPU)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from conftest import build_model
from erasure_fast.scanning import (CorpusChanged, CorpusError, OutputDirError, ScanInterrupted, ScanJob, open_corpus,
                                   plan_scan, scan)
from erasure_fast.scanning import checkpoint as ckpt
from erasure_fast.scanning.outdir import OutputLock

SMALL = dict(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64)


@pytest.fixture(scope="module")
def model():
    return build_model(**SMALL, seed=7)


@pytest.fixture()
def stream(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(3).integers(0, 50, size=23 * 16).astype(np.int64))
    return path


def kw(**extra):
    return dict(dict(seq_len=16, batch_size=4, progress=False), **extra)


def state(out):
    return ckpt.load(os.path.join(str(out), "checkpoint", "rank0-of-1.npz"))


def test_a_locked_output_folder_refuses_a_second_scan(model, stream, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(str(out)):
        with pytest.raises(OutputDirError, match=rf"is in use by another scan \(.*\"pid\": {os.getpid()}"):
            scan(model, stream, out_dir=out, **kw())
        assert not os.path.exists(out / "checkpoint")  # the refused scan wrote nothing
    res = scan(model, stream, out_dir=out, **kw())  # released: the folder is usable again
    assert res.meta["tokens"] == 23 * 16
    with ScanJob(plan_scan(model, stream, out_dir=out, **kw())):  # the lock is held for the job's lifetime
        with pytest.raises(OutputDirError, match="in use by another scan"):
            scan(model, stream, out_dir=out, **kw())


def test_an_output_path_that_is_a_file_is_refused_before_any_work(model, stream, tmp_path):
    (tmp_path / "report.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="out_dir: .*report.txt' exists and is not a directory"):
        scan(model, stream, out_dir=tmp_path / "report.txt", **kw())
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "checkpoint").write_text("not a folder")
    with pytest.raises(OutputDirError, match="holds a file named 'checkpoint'"):
        scan(model, stream, out_dir=tmp_path / "o", **kw())
    assert (tmp_path / "report.txt").read_text() == "mine"


def test_a_corpus_changed_in_the_scanned_part_refuses_to_resume(model, tmp_path):
    """A 2.2 MiB corpus edited in its middle -- where a fingerprint of its size and first / last MiB
    would not look -- after a checkpoint that aggregated that part: resume is refused."""
    path = tmp_path / "big.npy"
    a = np.random.default_rng(0).integers(0, 50, size=290_000).astype(np.int64)
    np.save(path, a)
    args = dict(seq_len=64, batch_size=512, progress=False, max_tokens=6 * 512 * 64, report=False)
    with ScanJob(plan_scan(model, path, out_dir=tmp_path / "o", **args)) as job:
        assert job.run(max_batches=5) is False  # 5 batches = tokens [0, 163840)
    edited = a.copy()
    edited[140_000] = (edited[140_000] + 1) % 50  # beyond the first MiB, before the last MiB
    np.save(path, edited)
    # the refusal names the batch that changed: row 140,000 // 64 = 2,187 lies in rows 2,048-2,559
    with pytest.raises(CorpusChanged, match=r"big.npy: the corpus changed since .* was written: rows 2,048-2,559 no "
                                            r"longer hold the tokens it read \(byte offset 1048704\)"):
        scan(model, path, out_dir=tmp_path / "o", **args)
    np.save(path, a)  # restored: resumes, and the result is that of an uninterrupted scan
    resumed = scan(model, path, out_dir=tmp_path / "o", **args)
    fresh = scan(model, path, out_dir=tmp_path / "fresh", **args)
    assert resumed.meta["corpus"]["content_hash"] == fresh.meta["corpus"]["content_hash"]
    assert resumed.meta["tokens"] == fresh.meta["tokens"] == 6 * 512 * 64


def test_a_change_after_the_checkpoint_is_simply_scanned(model, stream, tmp_path):
    with ScanJob(plan_scan(model, stream, out_dir=tmp_path / "o", **kw())) as job:
        job.run(max_batches=2)  # rows 0-7
    a = np.load(stream)
    a[20 * 16] = (a[20 * 16] + 1) % 50  # row 20: not read yet
    np.save(stream, a)
    resumed = scan(model, stream, out_dir=tmp_path / "o", **kw())
    fresh = scan(model, stream, out_dir=tmp_path / "fresh", **kw())
    assert resumed.meta["corpus"]["content_hash"] == fresh.meta["corpus"]["content_hash"]


def test_sigint_stops_cleanly_with_a_checkpoint_and_resumes_exactly(model, stream, tmp_path, monkeypatch):
    full = scan(model, stream, out_dir=tmp_path / "full", **kw())
    import erasure_fast.scanning.job as job_module

    real_update = job_module.update
    calls = []

    def update_then_sigint(*a, **k):  # Ctrl-C arrives while the third batch is being aggregated
        real_update(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(job_module, "update", update_then_sigint)
    # A shell ignores SIGINT in jobs it starts in the background (`make test &`), and a scan leaves an
    # ignored SIGINT alone; this test is about the default handler, so it sets it (and restores it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupted_scan(model, stream, tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(job_module, "update", real_update)
    resumed = scan(model, stream, out_dir=tmp_path / "out", **kw())
    ref, got = state(tmp_path / "full")[0], state(tmp_path / "out")[0]
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert resumed.meta["tokens"] == full.meta["tokens"]


def _interrupted_scan(model, stream, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(ScanInterrupted, match=r"interrupted \(SIGINT\) after 192 tokens; checkpoint saved in .*run the same scan again"):
        scan(model, stream, out_dir=tmp_path / "out", **kw())
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    assert state(tmp_path / "out")[1]["next_batch"] == 3


def test_a_failing_plot_does_not_lose_the_report(model, stream, tmp_path, monkeypatch):
    import erasure_fast.scanning.plots as plots

    def broken(*a, **k):
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(plots, "heatmap", broken)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="plot heatmap_pr.png failed"):
        res = scan(model, stream, out_dir=out, **kw())
    md = (out / "report.md").read_text()
    assert "heatmap_pr.png: not drawn (RuntimeError: no fonts here)" in md
    assert (out / "fig1_resid_pr.png").exists() and not (out / "heatmap_pr.png").exists()
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["plot_errors"] == {"heatmap_pr.png": "RuntimeError: no fonts here"}
    assert len(res.summary) > 0


def test_a_fresh_scan_replaces_the_previous_outputs(model, stream, tmp_path, monkeypatch):
    """resume=False into a folder with a finished scan: nothing of the old scan survives next to the
    new one (here the old heatmap, which the new scan fails to draw)."""
    out = tmp_path / "out"
    scan(model, stream, out_dir=out, writers=["L0H0"], **kw())
    assert (out / "heatmap_pr.png").exists()
    with pytest.raises(ValueError, match=r"different configuration \(differs in: writers \(checkpoint: \[0\], now: \[1\]\)"):
        scan(model, stream, out_dir=out, writers=["L0H1"], **kw())
    import erasure_fast.scanning.plots as plots

    monkeypatch.setattr(plots, "heatmap", lambda *a, **k: 1 / 0)
    with pytest.warns(UserWarning):
        scan(model, stream, out_dir=out, writers=["L0H1"], resume=False, **kw())
    assert not (out / "heatmap_pr.png").exists()
    assert json.loads((out / "summary.json").read_text())["meta"]["writers"] == ["L0H1"]
    assert state(out)[1]["config"]["writer_labels"] == ["L0H1"]


def test_text_corpus_too_short_or_empty_is_refused(tmp_path, model):
    from test_scan import _word_tokenizer

    tok = _word_tokenizer()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match=r"empty.txt: 0 tokens in all, fewer than one row of seq_len 16; nothing to scan"):
        open_corpus(str(tmp_path / "empty.txt"), tokenizer=tok, seq_len=16)
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "w1 w2 w3"}) + "\n")
    with pytest.raises(CorpusError, match=r"short.jsonl: 4 tokens in all"):
        scan(model, str(tmp_path / "short.jsonl"), tokenizer=tok, out_dir=tmp_path / "o", **kw())
    assert not os.path.exists(tmp_path / "o" / "checkpoint")


def test_hub_names_need_the_prefix_and_a_valid_name(tmp_path):
    with pytest.raises(CorpusError, match="not a hub dataset name"):
        open_corpus("hf:not a name!", seq_len=8)


def test_checkpoints_store_counts_narrowed_and_load_them_back_exactly(tmp_path):
    """Non-negative int64 arrays that fit are stored as uint32 (half the bytes) and come back as the
    same int64 values; one beyond 2^32, a negative one, floats and empty arrays are stored as they are."""
    arrays = dict(hist=np.arange(24, dtype=np.int64).reshape(2, 3, 4) * 178_956_970,  # up to ~4.1e9 < 2^32
                  big=np.array([0, 2 ** 32], np.int64), neg=np.array([-1, 5], np.int64),
                  mean=np.array([0.5, -1.0]), empty=np.zeros((0, 3), np.int64))
    path = str(tmp_path / "ck" / "rank0-of-1.npz")
    ckpt.save(path, arrays, dict(tokens=7))
    with np.load(path) as raw:
        stored = {k: raw[k].dtype for k in raw.files}
    assert stored["hist"] == np.uint32 and stored["big"] == np.int64 and stored["neg"] == np.int64
    got, meta = ckpt.load(path)
    assert meta == dict(tokens=7)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    with pytest.raises(ValueError, match="may not use the key"):
        ckpt.save(path, arrays, dict(narrowed_to_uint32=[]))
