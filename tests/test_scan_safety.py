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


# -- the output folder: only the scan's own files ---------------------------------------------------


def _tree(root) -> dict:
    """{relative path: bytes} of every file under ``root`` (what must survive untouched)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_holding_files_no_scan_wrote_is_refused_and_left_alone(model, stream, tmp_path):
    """The issue's data loss: a fresh scan into proj/ removed proj/checkpoint/step1000/model.bin and
    overwrote a user's report.md. Now it is refused before any work, naming the files, and nothing in
    the folder changes."""
    proj = tmp_path / "proj"
    (proj / "checkpoint" / "step1000").mkdir(parents=True)
    (proj / "checkpoint" / "step1000" / "model.bin").write_bytes(b"w")
    (proj / "report.md").write_text("my notes")
    before = _tree(proj)
    for resume in (True, False):
        with pytest.raises(OutputDirError, match=r"out_dir: .*proj' holds files no scan wrote there "
                                                 r"\('report.md', 'checkpoint/step1000/model.bin'\); .*--force"):
            scan(model, stream, out_dir=proj, resume=resume, **kw())
    assert _tree(proj) == before and sorted(os.listdir(proj)) == ["checkpoint", "report.md"]


def test_overwrite_writes_only_the_scans_names_and_removes_only_what_a_scan_wrote(model, stream, tmp_path):
    proj = tmp_path / "proj"
    (proj / "checkpoint" / "step1000").mkdir(parents=True)
    (proj / "checkpoint" / "step1000" / "model.bin").write_bytes(b"w")
    (proj / "notes.txt").write_text("mine")
    scan(model, stream, out_dir=proj, writers=["L0H0"], overwrite=True, **kw())
    manifest = json.loads((proj / ".erasure-fast-manifest.json").read_text())["files"]
    assert "report.md" in manifest and "checkpoint/rank0-of-1.npz" in manifest and "notes.txt" not in manifest
    assert not [f for f in _tree(proj) if f not in manifest and f not in
                ("notes.txt", "checkpoint/step1000/model.bin", ".erasure-fast.lock", ".erasure-fast-manifest.json")]
    # a fresh scan there (other writers, a plot that fails) removes the previous scan's files -- and only those
    import erasure_fast.scanning.plots as plots

    real = plots.heatmap
    plots.heatmap = lambda *a, **k: 1 / 0
    try:
        with pytest.warns(UserWarning):
            scan(model, stream, out_dir=proj, writers=["L0H1"], resume=False, overwrite=True, **kw())
    finally:
        plots.heatmap = real
    assert not (proj / "heatmap_pr.png").exists()  # the previous scan's, removed
    assert (proj / "notes.txt").read_text() == "mine" and (proj / "checkpoint" / "step1000" / "model.bin").read_bytes() == b"w"
    # the folder is the scans' own now, but for the user's files: still refused without overwrite
    with pytest.raises(OutputDirError, match=r"\('notes.txt', 'checkpoint/step1000/model.bin'\)"):
        scan(model, stream, out_dir=proj, writers=["L0H1"], **kw())


def test_a_folder_a_scan_wrote_is_reused_without_overwrite(model, stream, tmp_path):
    """Its own files are the scan's to resume, finish again or replace: no --force needed."""
    out = tmp_path / "out"
    with ScanJob(plan_scan(model, stream, out_dir=out, **kw())) as job:
        job.run(max_batches=2)
    assert scan(model, stream, out_dir=out, **kw()).meta["tokens"] == 23 * 16  # resumed
    scan(model, stream, out_dir=out, resume=False, writers=["L1H2"], **kw())  # replaced


def test_the_corpus_is_never_touched_even_inside_the_output_folder(model, tmp_path):
    """The issue's self-deleting scan: --corpus proj2/checkpoint/tokens.npy --out proj2 removed its own
    corpus. It is refused like any file no scan wrote; told to scan there anyway, the corpus survives
    fresh scans; and a corpus that is the scan's own output place is refused whatever it is told."""
    proj = tmp_path / "proj2"
    (proj / "checkpoint").mkdir(parents=True)
    corpus = proj / "checkpoint" / "tokens.npy"
    np.save(corpus, np.random.default_rng(3).integers(0, 50, size=23 * 16).astype(np.int64))
    data = corpus.read_bytes()
    with pytest.raises(OutputDirError, match=r"\('checkpoint/tokens.npy'\)"):
        scan(model, corpus, out_dir=proj, **kw())
    for _ in range(2):
        assert scan(model, corpus, out_dir=proj, resume=False, overwrite=True, **kw()).meta["tokens"] == 23 * 16
    assert corpus.read_bytes() == data
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed")
    datasets.Dataset.from_dict({"tokens": [list(range(16))] * 4}).save_to_disk(str(tmp_path / "ds" / "checkpoint"))
    with pytest.raises(OutputDirError, match=r"corpus: .*ds/checkpoint' is where the scan writes its outputs"):
        scan(model, tmp_path / "ds" / "checkpoint", out_dir=tmp_path / "ds", overwrite=True, **kw())
    with pytest.raises(OutputDirError, match=r"corpus: .*ds/checkpoint' is where the scan writes its outputs"):
        scan(model, tmp_path / "ds" / "checkpoint", out_dir=tmp_path / "ds" / "checkpoint", overwrite=True, **kw())


def test_a_manifest_no_scan_wrote_never_directs_a_removal(model, stream, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep")
    (out / ".erasure-fast-manifest.json").write_text(json.dumps({"files": ["../victim.txt", "report.md"]}))
    with pytest.raises(OutputDirError, match=r"\.erasure-fast-manifest.json is not a scan's manifest .*lists files no scan"):
        scan(model, stream, out_dir=out, **kw())
    scan(model, stream, out_dir=out, resume=False, overwrite=True, **kw())  # told to: the manifest owns nothing
    assert (tmp_path / "victim.txt").read_text() == "keep"


def test_a_checkpoint_folder_that_is_a_link_is_refused(model, stream, tmp_path):
    """Checkpoints written through a link would land outside the output folder."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "checkpoint")
    with pytest.raises(OutputDirError, match="holds a symbolic link named 'checkpoint'"):
        scan(model, stream, out_dir=tmp_path / "out", overwrite=True, **kw())
    assert not os.listdir(tmp_path / "elsewhere")


# -- paths ---------------------------------------------------------------------------------------------


def test_every_path_is_expanded_once_at_the_start(model, tmp_path, monkeypatch):
    """out_dir='~/x' scanned into a literal ./~/x while pandas wrote the summaries to $HOME/x. Now '~'
    and $VARS are expanded once for the output folder and the corpus alike."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    np.save(home / "data" / "c.npy", np.random.default_rng(3).integers(0, 50, size=8 * 16).astype(np.int64))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("EF_TEST_DATA", str(home / "data"))
    monkeypatch.chdir(tmp_path)
    res = scan(model, "$EF_TEST_DATA/c.npy", out_dir="~/x", **kw())
    assert res.out_dir == str(home / "x") and res.meta["corpus"]["source"] == str(home / "data" / "c.npy")
    assert sorted(os.listdir(home / "x")) == sorted(
        [".erasure-fast.lock", ".erasure-fast-manifest.json", "checkpoint", "fig1_resid_pr.png", "fig2_node_pr.png",
         "heatmap_pr.png", "report.html", "report.md", "summary.csv", "summary.json", "summary.parquet"])
    assert not (tmp_path / "~").exists() and not [f for f in os.listdir(home) if f.startswith(".tmp-")]


# -- resume: what matters is the part already scanned ---------------------------------------------


def _same_state(a_dir, b_dir, same_batches: bool) -> None:
    """The checkpoints of two scans of the same tokens: bit for bit when they ran the same batches;
    otherwise (one continued a shorter scan) the same tokens read once each, in order (the row hash
    does not depend on the batching), the same counts, moments to float32 rounding (the forward pass
    of a batch of other rows rounds differently), and at most a few values per thousand in a
    neighbouring histogram bin (a value on a bin edge moved by that rounding)."""
    (a, a_meta), (b, b_meta) = state(a_dir), state(b_dir)
    assert a.keys() == b.keys() and a_meta["content_hash"] == b_meta["content_hash"]
    assert (a_meta["tokens"], a_meta["rows"]) == (b_meta["tokens"], b_meta["rows"])
    for key in a:
        if same_batches or key.endswith((".count", ".nan")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        elif key.endswith(".hist"):
            assert np.abs(a[key] - b[key]).sum() <= 2e-3 * b[key].sum(), key
        elif not key.startswith(("prefix.", "top_")):  # hash marks per chunk; top examples may tie differently
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_smaller_max_tokens_reports_the_larger_checkpoint_with_a_warning(model, stream, tmp_path):
    """A finished scan rerun with a smaller max_tokens used to be refused as "the corpus changed"."""
    out = tmp_path / "out"
    full = scan(model, stream, out_dir=out, **kw())
    with pytest.warns(UserWarning, match=r"already holds a scan of 368 tokens, beyond max_tokens \(80 tokens\); the "
                                         r"report covers all of them"):
        again = scan(model, stream, out_dir=out, max_tokens=5 * 16, **kw())
    assert again.meta["tokens"] == full.meta["tokens"] == 23 * 16


def test_a_larger_max_tokens_continues_the_scan(model, stream, tmp_path):
    """6 rows in batches of 4 end in a short batch; 14 rows then continue it (the rest of that batch,
    then whole batches) and equal a fresh scan of 14 rows, as every row then equals a full scan's."""
    out = tmp_path / "out"
    scan(model, stream, out_dir=out, max_tokens=6 * 16, **kw())
    res = scan(model, stream, out_dir=out, max_tokens=14 * 16, **kw())
    assert res.meta["rows"] == 14
    scan(model, stream, out_dir=tmp_path / "fresh14", max_tokens=14 * 16, **kw())
    _same_state(out, tmp_path / "fresh14", same_batches=False)
    scan(model, stream, out_dir=out, **kw())
    scan(model, stream, out_dir=tmp_path / "fresh", **kw())
    _same_state(out, tmp_path / "fresh", same_batches=False)


def test_a_corpus_that_grew_after_the_scanned_part_resumes(model, tmp_path):
    path = tmp_path / "grows.npy"
    a = np.random.default_rng(5).integers(0, 50, size=23 * 16).astype(np.int64)
    np.save(path, a)
    scan(model, path, out_dir=tmp_path / "out", **kw())
    np.save(path, np.concatenate([a, np.random.default_rng(6).integers(0, 50, size=9 * 16)]))
    assert scan(model, path, out_dir=tmp_path / "out", **kw()).meta["rows"] == 32
    scan(model, path, out_dir=tmp_path / "fresh", **kw())
    _same_state(tmp_path / "out", tmp_path / "fresh", same_batches=False)
    np.save(path, a[: 10 * 16])  # shrunk into the scanned part: refused, saying so
    with pytest.raises(CorpusChanged, match=r"it now ends after 10 of the 32 rows this process had read"):
        scan(model, path, out_dir=tmp_path / "out", **kw())


def _jsonl(path, docs) -> None:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def test_a_late_corpus_error_saves_the_checkpoint_and_the_fixed_corpus_resumes(model, tmp_path):
    """A bad line late in a .jsonl: the batches before it are saved (none was, before), the error says
    so and where the line is; fixing the line changes the file's size, which no longer blocks resume
    (only the tokens already read are compared); the resumed scan equals a fresh one bit for bit."""
    from test_scan import _word_tokenizer

    tok = _word_tokenizer()
    docs = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(30)) for i in range(40)]
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d}) for d in docs]
    lines[30] = '{"text": null}'
    path.write_text("\n".join(lines) + "\n")
    args = dict(kw(checkpoint_every=1000), tokenizer=tok)
    # documents 0-29 (31 tokens each, EOS included) fill 58 rows of 16; the 14 whole batches of 4 before
    # the bad line were scanned: 56 rows, 896 tokens
    with pytest.raises(CorpusError, match=r"c.jsonl: line 31: field 'text' is null, not a string; the 896 tokens "
                                          r"scanned before it are saved in .*rank0-of-1.npz; fix the cause"):
        scan(model, path, out_dir=tmp_path / "out", **args)
    assert state(tmp_path / "out")[1]["tokens"] == 896
    _jsonl(path, docs)
    with ScanJob(plan_scan(model, path, out_dir=tmp_path / "out", **args)) as job:
        assert job.resumed_from > 0
        job.run()
        job.finish()
    scan(model, path, out_dir=tmp_path / "fresh", **args)
    _same_state(tmp_path / "out", tmp_path / "fresh", same_batches=True)


def test_a_checkpoint_of_an_earlier_format_is_refused_saying_so(model, stream, tmp_path):
    out = tmp_path / "out"
    with ScanJob(plan_scan(model, stream, out_dir=out, **kw())) as job:
        job.run(max_batches=1)
    arrays, meta = state(out)
    del meta["format"]
    ckpt.save(str(out / "checkpoint" / "rank0-of-1.npz"), arrays, meta)
    with pytest.raises(ValueError, match=r"written by an earlier erasure_fast \(checkpoint format 1, this one reads 3\)"):
        scan(model, stream, out_dir=out, **kw())
