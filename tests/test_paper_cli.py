"""`erasure-fast paper` in-process (`erasure_fast.paper.cli.add_arguments` / `run`) on small
TransformerLens-style checkpoints written here, some with a small tokenizer trained offline:
every user error is refused before any work, with one line naming its flag; fig 4 falls back to
corpus windows (and says why) when the model cannot run the paper's prompts; the miner reopens the
corpus its scan read and refuses any other."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import write_tl_checkpoint
from erasure_fast import load_model, paper
from erasure_fast.demo import demo_corpus
from erasure_fast.paper.cli import add_arguments, run
from erasure_fast.scanning import scan

DIMS = dict(n_layers=4, n_heads=8, d_head=8, d_model=64, d_mlp=128, d_vocab=300, n_ctx=128)
BOS = 0


def paper_args(*argv):
    """The Namespace `erasure-fast paper ARGV` gives (the main CLI uses this formatter too)."""
    parser = argparse.ArgumentParser(prog="erasure-fast paper", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def all_paths(root) -> set:
    return {os.path.join(d, f) for d, dirs, files in os.walk(root) for f in dirs + files}


def refused(args, flag: str, root) -> str:
    """Run ``args``; assert a ValueError / TypeError whose one-line message starts with ``flag`` and
    that nothing under ``root`` was created or removed. Returns the message."""
    before = all_paths(root)
    with pytest.raises((ValueError, TypeError)) as info:
        run(args)
    message = str(info.value)
    assert message.startswith(flag + ":") or message.startswith(flag + " "), message
    assert "\n" not in message
    assert all_paths(root) == before, "a refused job wrote files"
    return message


def save_tokenizer(path, texts, vocab_size: int) -> str:
    """A byte-level BPE tokenizer trained here on ``texts`` (no download), saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(str(path))
    return str(path)


def checkpoint(path, dims=DIMS, seed=0, tokenizer=None) -> str:
    """A TL-style checkpoint directory (random weights), naming ``tokenizer`` (a local directory)."""
    write_tl_checkpoint(path, dims, seed=seed, fmt="safetensors")
    if tokenizer is not None:
        cfg_path = os.path.join(path, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["tokenizer_name"] = tokenizer
        json.dump(cfg, open(cfg_path, "w"))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints, corpora and a scan of the plain checkpoint over a .npy corpus."""
    root = tmp_path_factory.mktemp("paper_cli")
    f = {"root": root}
    f["model"] = checkpoint(root / "model")
    f["other_model"] = checkpoint(root / "other_model", seed=1)
    split_tok = save_tokenizer(root / "tok_small", ["the cat sat on the mat, in the cupboard. " * 20], 280)
    f["model_small_tok"] = checkpoint(root / "model_small_tok", tokenizer=split_tok)
    paper_texts = [text + answer for text, *answers in paper.ADVERSARIAL_PROMPTS for answer in answers] * 20
    paper_tok = save_tokenizer(root / "tok_paper", paper_texts, 400)
    f["model_paper_tok"] = checkpoint(root / "model_paper_tok", dims=dict(DIMS, d_vocab=400), tokenizer=paper_tok)
    f["model_paper_tok_small_vocab"] = checkpoint(root / "model_paper_tok_small_vocab", tokenizer=paper_tok)
    rows = demo_corpus(8, 96, DIMS["d_vocab"], seed=2)
    for name, arr in (("corpus", rows), ("corpus_6rows", rows[:6]), ("one_row", rows[:1, :40]),
                      ("bad_ids", np.where(rows == rows[0, 3], 5000, rows))):
        f[name] = str(root / f"{name}.npy")
        np.save(f[name], arr)
    f["a_file"] = str(root / "a_file.txt")
    open(f["a_file"], "w").write("not a directory")
    f["empty_dir"] = str(root / "empty_dir")
    os.makedirs(f["empty_dir"])
    f["scan"] = str(root / "scan")
    scan(load_model(f["model"]), f["corpus"], writers=["L0H2"], batch_size=4, out_dir=f["scan"], prepend_bos=BOS,
         progress=False, report=True)
    return f


def base_args(files, out, analysis="fig1", model="model"):
    return [analysis, "--model", files[model], "--seq-len", 40, "--rows", 2, "--samples", 2, "--out", out]


def test_help_documents_every_option_and_its_default():
    parser = argparse.ArgumentParser(prog="erasure-fast paper", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert {o for a in options for o in a.option_strings} >= {
        "--scan-dir", "--model", "--corpus", "--out", "--writer", "--erasers", "--rows", "--seq-len", "--samples",
        "--prepend-bos", "--device", "--capture", "--weights"}
    assert all(a.help for a in options)
    text = " ".join(parser.format_help().split())
    assert text.count("(default: ") == len(options)
    args = parser.parse_args([])
    assert args.analysis == "all" and args.corpus is None and args.out == "paper_out" and args.rows == 4


CASES = [  # (analysis, extra options, the flag the message must start with)
    ("fig1", ["--rows", 0], "--rows"),
    ("fig1", ["--samples", 0], "--samples"),
    ("fig1", ["--seq-len", 1], "--seq-len"),
    ("fig1", ["--seq-len", 129], "--seq-len"),  # beyond n_ctx 128
    ("fig1", ["--writer", "L9H0"], "--writer"),
    ("fig1", ["--writer", "L0H2,L1H1"], "--writer"),
    ("fig3", ["--erasers", "L2H3,L3H1"], "--erasers"),  # not one layer
    ("fig5", ["--erasers", "L0H5"], "--erasers"),  # not after the writer's layer
    ("fig8", ["--erasers", "L2H9"], "--erasers"),  # no such head
    ("all", ["--erasers", "L2H3,L3H1"], "--erasers"),  # fig 3's prerequisite: nothing of figs 1/2 written
    ("fig1", ["--prepend-bos", 300], "--prepend-bos"),
    ("fig1", ["--prepend-bos", -1], "--prepend-bos"),
    ("fig1", ["--corpus", "{root}/missing.npy"], "--corpus"),
    ("fig1", ["--corpus", "{root}/missing.bin", "--bin-dtype", "uint16"], "--corpus"),
    ("fig1", ["--corpus", "{one_row}"], "--corpus"),  # 1 row, --rows 2
    ("fig1", ["--corpus", "{bad_ids}"], "--corpus"),  # ids beyond d_vocab
    ("fig1", ["--out", "{a_file}"], "--out"),
    ("fig1", ["--out", "{a_file}/sub"], "--out"),
    ("fig1", ["--device", "nonsense"], "--device"),
    ("fig1", ["--model", "{root}/no_such_model"], "--model"),
    ("fig5", ["--rows", 1, "--seq-len", 3], "--rows"),  # 2 points: too few for the fit
    ("fig5", ["--rows", 1, "--seq-len", 35], "--rows"),  # the fit starts at position 32, as the paper's: 2 points
    ("fig4", ["--samples", 100, "--corpus", "{corpus}"], "--corpus"),  # fewer rows than donors asked for
    ("mine", [], "--scan-dir"),
    ("mine", ["--scan-dir", "{empty_dir}"], "--scan-dir"),
]


@pytest.mark.parametrize("analysis,extra,flag", CASES, ids=[f"{a}-{' '.join(map(str, e))}" for a, e, _ in CASES])
def test_user_errors_are_refused_before_any_work(files, tmp_path, analysis, extra, flag):
    out = tmp_path / "out"
    extra = [str(x).format(**files) for x in extra]
    refused(paper_args(*base_args(files, out, analysis), *extra), flag, files["root"])
    assert not out.exists()


def test_all_figures_on_a_file_corpus(files, tmp_path):
    out = tmp_path / "out"
    assert run(paper_args(*base_args(files, out, "all"), "--corpus", files["corpus"], "--erasers", "L2H3,L2H6")) == 0
    report = (out / "paper_report.md").read_text()
    assert files["corpus"] in report and "BOS" not in report.split("##")[0]  # no BOS asked for, none prepended
    for name in ("fig1_resid_pr.csv", "fig2_node_pr.csv", "fig3_causal_check.csv", "fig4_resample_ablation.csv",
                 "fig5_v_composition.csv", "fig8_bos_split.csv", "fig4_resample_ablation.png"):
        assert (out / name).stat().st_size > 0, name
    assert "not the paper's prompts because the model has no tokenizer" in report
    assert "capture: engine for runs without interventions" in report
    # a batch of fewer than 4 rows: fig 4's fallback uses as many prompts as there are rows
    assert len(pd.read_csv(out / "fig4_resample_ablation.csv")) == 2
    fig5 = pd.read_csv(out / "fig5_v_composition.csv")  # the authors' positions: 32 .. seq_len - 2
    assert len(fig5) == 2 * (40 - 1 - 32) and fig5.position.min() == 32 and fig5.position.max() == 38
    assert "slope" in report and "± 2 standard errors as the paper prints them" in report


def test_weights_are_processed_as_from_pretrained_unless_raw_is_asked_for(files, tmp_path):
    """--weights: the figures load a TransformerLens-style checkpoint as the authors' from_pretrained
    does by default, as stored with --weights raw; the report says which, and PR is not invariant to it."""
    medians = {}
    for weights, words in (("auto", "weights: processed as TransformerLens's HookedTransformer.from_pretrained"),
                           ("from_pretrained", "weights: processed as"), ("raw", "weights: raw (the checkpoint's")):
        out = tmp_path / weights
        assert run(paper_args(*base_args(files, out, "fig1"), "--weights", weights)) == 0
        assert words in (out / "paper_fig1.md").read_text()
        medians[weights] = pd.read_csv(out / "fig1_resid_pr.csv")["median"].to_numpy()
    np.testing.assert_array_equal(medians["auto"], medians["from_pretrained"])
    assert not np.allclose(medians["raw"], medians["from_pretrained"], rtol=1e-3)
    args = paper_args(*base_args(files, tmp_path / "bad", "fig1"))
    args.weights = "folded"
    assert "--weights: must be one of auto, raw, from_pretrained" in refused(args, "--weights", files["root"])


def test_report_sets_the_paper_numbers_beside_a_gelu_4l_run_only(files, tmp_path, monkeypatch):
    """GELU-4L in the local Hugging Face cache (a small stand-in with its layout): the report fills this
    run's column next to the published numbers; without it, 'auto' runs on the demo model and the report
    says plainly that it is not a reproduction and why."""
    import huggingface_hub

    from erasure_fast.loading import GELU_4L_REPO
    from test_loading import fake_hf_cache

    cache = tmp_path / "hub"
    fake_hf_cache(cache, GELU_4L_REPO, DIMS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "gelu"
    assert run(paper_args("fig1", "--model", "gelu-4l", "--rows", 2, "--seq-len", 40, "--out", out)) == 0
    report = (out / "paper_fig1.md").read_text()
    resid = pd.read_csv(out / "fig1_resid_pr.csv").set_index("node")["median"]
    assert f"| Fig. 1 | median PR of resid_mid2 onto L0H2 | +0.100 | {resid['resid_mid2']:+.3f} | " in report
    assert "Not a reproduction" not in report
    assert "| Fig. 3 | median PR of resid_post3 onto L0H2, patched | +0.480 | n/a |" in report  # fig 3 not run
    assert "statistics, in every table: median = mean of the two middle values" in report
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    out = tmp_path / "auto"
    assert run(paper_args("fig1", "--model", "auto", "--rows", 1, "--seq-len", 40, "--out", out)) == 0
    report = (out / "paper_fig1.md").read_text()
    assert "**Not a reproduction:** GELU-4L (NeelNanda/GELU_4L512W_C4_Code) is not in the local Hugging Face cache" in report
    assert "| Fig. 1 | median PR of resid_mid0 onto L0H2 | +0.960 | n/a |" in report


def test_figures_without_corpus_use_the_demo_corpus_and_say_so(files, tmp_path):
    out = tmp_path / "out"
    assert run(paper_args(*base_args(files, out, "fig8"))) == 0
    report = (out / "paper_fig8.md").read_text()
    assert "synthetic demo corpus" in report and "--corpus not given" in report and "BOS 0 prepended" in report


def test_fig4_falls_back_when_the_answers_are_not_single_tokens(files, tmp_path):
    model = load_model(files["model_small_tok"])
    assert model.tokenizer is not None and paper.paper_prompts(model) is None
    reason = paper.paper_prompts_unavailable(model)
    assert "' bottom'" in reason and "not one" in reason
    out = tmp_path / "out"
    assert run(paper_args(*base_args(files, out, "fig4", "model_small_tok"))) == 0  # was: AssertionError in TL
    report = (out / "paper_fig4.md").read_text()
    assert f"not the paper's prompts because {reason}" in report


def test_fig4_falls_back_when_the_tokenizer_exceeds_the_vocabulary(files):
    model = load_model(files["model_paper_tok_small_vocab"])
    assert paper.paper_prompts(model) is None
    assert "beyond the model's d_vocab 300" in paper.paper_prompts_unavailable(model)


def test_fig4_runs_the_paper_prompts_with_a_tokenizer_that_has_them(files, tmp_path):
    model = load_model(files["model_paper_tok"])
    assert paper.paper_prompts_unavailable(model) is None
    prompts = paper.paper_prompts(model)
    assert [p[0] for p in prompts] == [text for text, _, _ in paper.ADVERSARIAL_PROMPTS]
    assert all(isinstance(good, int) and isinstance(bad, int) and good != bad for _, _, good, bad in prompts)
    longest = max(len(ids) for _, ids, _, _ in prompts)
    out = tmp_path / "out"
    message = refused(paper_args(*base_args(files, out, "fig4", "model_paper_tok"), "--seq-len", longest - 1),
                      "--seq-len", files["root"])
    assert f">= {longest}" in message
    assert run(paper_args(*base_args(files, out, "fig4", "model_paper_tok"))) == 0
    report = (out / "paper_fig4.md").read_text()
    assert "Prompts: the paper's four adversarial prompts." in report
    assert len(pd.read_csv(out / "fig4_resample_ablation.csv")) == 4
    # fig 4b: each prompt with the head the authors resample on it
    assert "### Fig. 4b" in report and (out / "fig4b_resample_ablation.png").stat().st_size > 0
    assert [p.split(":")[0] for p in pd.read_csv(out / "fig4b_resample_ablation.csv").prompt] == ["L3H1", "L2H1", "L3H5", "L2H2"]


def test_mine_reopens_the_corpus_the_scan_read(files, tmp_path):
    out = tmp_path / "out"
    assert run(paper_args("mine", "--model", files["model"], "--scan-dir", files["scan"], "--out", out)) == 0
    table = pd.read_csv(out / "adversarial_candidates.csv")
    assert len(table) > 0
    rows = np.load(files["corpus"])
    for r in table.itertuples():  # the context is the scanned row's tokens (BOS prepended as scanned)
        row = np.concatenate([[BOS], rows[r.row][:-1]])
        assert r.context == " ".join(map(str, row[max(0, r.pos - 11): r.pos + 2].tolist()))
    assert files["corpus"] in (out / "paper_mine.md").read_text()


def scan_copy(files, tmp_path, **corpus_record) -> str:
    """A copy of the fixture scan whose summary.json records ``corpus_record`` for its corpus."""
    path = tmp_path / "scan_copy"
    shutil.copytree(files["scan"], path)
    summary = json.load(open(path / "summary.json"))
    summary["meta"]["corpus"].update(corpus_record)
    json.dump(summary, open(path / "summary.json", "w"))
    return str(path)


MINE_REFUSALS = [  # (extra options, the flag at fault)
    (["--corpus", "{corpus_6rows}"], "--corpus"),  # fewer rows than the scan read
    (["--corpus", "demo"], "--corpus"),  # the scan did not read the demo corpus
    (["--corpus", "{root}/missing.npy"], "--corpus"),
    (["--writer", "L1H0"], "--writer"),  # not the scan's focus writer
    (["--prepend-bos", 5], "--prepend-bos"),  # the scan prepended 0
    (["--model", "{other_model}"], "--model"),  # other weights than the scan's
    (["--erasers", "L2H3,L3H1"], "--erasers"),
    (["--out", "{a_file}"], "--out"),
]


@pytest.mark.parametrize("extra,flag", MINE_REFUSALS, ids=[" ".join(map(str, e)) for e, _ in MINE_REFUSALS])
def test_mine_refuses_what_does_not_match_the_scan(files, tmp_path, extra, flag):
    args = ["mine", "--model", files["model"], "--scan-dir", files["scan"], "--out", tmp_path / "out"]
    refused(paper_args(*args, *[str(x).format(**files) for x in extra]), flag, files["root"])


def test_mine_without_corpus_needs_one_the_scan_can_name(files, tmp_path):
    moved = scan_copy(files, tmp_path, source=str(tmp_path / "moved.npy"))
    message = refused(paper_args("mine", "--model", files["model"], "--scan-dir", moved, "--out", tmp_path / "out"),
                      "--corpus", tmp_path)
    assert "not there" in message
    shutil.rmtree(moved)
    in_memory = scan_copy(files, tmp_path, source="<array>")
    message = refused(paper_args("mine", "--model", files["model"], "--scan-dir", in_memory, "--out", tmp_path / "out"),
                      "--corpus", tmp_path)
    assert "--corpus demo" in message


def test_mine_with_corpus_demo_reopens_the_demo_scan(files, tmp_path):
    model = load_model(files["model"])
    scan(model, demo_corpus(64, 48, DIMS["d_vocab"]), writers=["L0H2"], batch_size=16, out_dir=str(tmp_path / "scan"),
         prepend_bos=BOS, progress=False, report=True)
    args = ["mine", "--model", files["model"], "--scan-dir", tmp_path / "scan", "--out", tmp_path / "out"]
    refused(paper_args(*args), "--corpus", tmp_path)  # an in-memory corpus: which one must be said
    assert run(paper_args(*args, "--corpus", "demo")) == 0
    table = pd.read_csv(tmp_path / "out" / "adversarial_candidates.csv")
    r = table.iloc[0]
    row = np.concatenate([[BOS], demo_corpus(64, 48, DIMS["d_vocab"])[r.row][:-1]])
    assert r.context == " ".join(map(str, row[max(0, r.pos - 11): r.pos + 2].tolist()))
