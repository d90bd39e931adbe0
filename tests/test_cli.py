"""The command line as a user meets it: help that lists every command and default, one-line errors
with exit status 2 (a traceback only with --debug), a locked output folder, Ctrl-C that saves and
says how to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_cli, write_tl_checkpoint
from erasure_fast.scanning import checkpoint as ckpt
from erasure_fast.scanning.outdir import OutputLock

DIMS = dict(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_tl_checkpoint(root / "model", DIMS, seed=11)
    np.save(root / "tokens.npy", np.random.default_rng(5).integers(0, 50, size=(40, 16)).astype(np.int32))
    return root


def cli(*args, **kw):
    return run_cli(*args, timeout=600, **kw)


def scan_args(root, out, *extra):
    return ["scan", "--model", root / "model", "--corpus", root / "tokens.npy", "--out", out, "--batch-size", "3",
            "--no-progress", *extra]


def one_line_error(proc, pattern: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("erasure-fast: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_help_lists_every_command_and_shows_defaults():
    top = cli("--help")
    assert top.returncode == 0
    for command in ("scan", "demo", "paper", "bench", "backends"):
        assert f"\n  {command}" in top.stdout, command
    scan_help = cli("scan", "--help").stdout
    for text in ("--batch-size BATCH_SIZE\n", "(default: 8)", "--checkpoint-every", "(default: 20)", "--seq-len",
                 "--max-tokens", "--bin-dtype", "required for .bin"):
        assert text in scan_help, text
    bench_help = " ".join(cli("bench", "--help").stdout.split())
    assert "(default: gelu-4l,gpt2-small)" in bench_help and "(default: benchmarks/results)" in bench_help


@pytest.mark.parametrize("case", ["missing npy", "missing bin", "missing txt", "no extension", "bin without dtype",
                                  "duplicate writers", "out is a file", "bad writer", "seq-len too long",
                                  "zero max-tokens", "bad checkpoint-every"])
def test_user_errors_are_one_line_and_exit_2(root, tmp_path, case):
    (tmp_path / "file").write_text("x")
    np.arange(32, dtype=np.int32).tofile(tmp_path / "ids.bin")
    args = {
        "missing npy": (["--corpus", tmp_path / "nope.npy"], r"nope.npy: no such file"),
        "missing bin": (["--corpus", tmp_path / "nope.bin", "--bin-dtype", "uint16"], r"nope.bin: no such file"),
        "missing txt": (["--corpus", tmp_path / "nope.txt"], r"nope.txt: no such file"),
        "no extension": (["--corpus", tmp_path / "nope"], r"nope: no such file or directory \(a dataset on the Hugging Face hub is named hf:"),
        "bin without dtype": (["--corpus", tmp_path / "ids.bin", "--seq-len", "8"], r"no header; pass its dtype \(bin_dtype / --bin-dtype"),
        "duplicate writers": (["--writers", "L0H2,L0H2"], r"error: --writers names head L0H2 twice"),
        "out is a file": (["--out", tmp_path / "file"], r"error: --out: .* exists and is not a directory"),
        "bad writer": (["--writers", "L7H0"], r"head 'L7H0' does not exist"),
        "seq-len too long": (["--seq-len", "100"], r"error: --seq-len 100 is longer than the stored rows of .*tokens.npy \(16 tokens\)"),
        "zero max-tokens": (["--max-tokens", "0"], r"error: --max-tokens must be >= 1, got 0"),
        "bad checkpoint-every": (["--checkpoint-every", "0"], r"error: --checkpoint-every must be >= 1, got 0"),
    }[case]
    extra, pattern = args
    base = scan_args(root, tmp_path / "out")
    for flag in ("--corpus", "--out"):  # a later flag overrides the default one
        if flag in extra:
            i = base.index(flag)
            del base[i:i + 2]
    t0 = time.time()
    one_line_error(cli(*base, *extra), pattern)
    assert time.time() - t0 < 60
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_debug_shows_the_traceback(root, tmp_path):
    proc = cli("--debug", *scan_args(root, tmp_path / "o", "--writers", "L0H2,L0H2"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "names head L0H2 twice" in proc.stderr


def test_a_second_scan_into_a_locked_folder_is_refused(root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(str(out)):  # another scan holds the folder
        proc = cli(*scan_args(root, out))
    one_line_error(proc, rf"is in use by another scan \(.*\"pid\": {os.getpid()}")
    assert not (out / "checkpoint").exists()


def test_ctrl_c_saves_a_checkpoint_and_rerunning_resumes_exactly(root, tmp_path):
    full = cli(*scan_args(root, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "out"
    ck = out / "checkpoint" / "rank0-of-1.npz"
    # SIGINT at its default in the child: a shell ignores it in background jobs (`make test &`), and an
    # ignored SIGINT is inherited (and left alone by the scan)
    proc = subprocess.Popen([sys.executable, "-m", "erasure_fast.cli", *map(str, scan_args(root, out, "--checkpoint-every", "1"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = ckpt.load(str(ck)) if ck.exists() else None
        if found is not None and found[1]["next_batch"] >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the scan finished before the signal arrived (machine too fast for this corpus)")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "scan interrupted (SIGINT) after" in err and "run the same scan again" in err
    stopped_at = ckpt.load(str(ck))[1]["next_batch"]
    assert 2 <= stopped_at < 14
    resumed = cli(*scan_args(root, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    ref, _ = ckpt.load(str(tmp_path / "full" / "checkpoint" / "rank0-of-1.npz"))
    got, meta = ckpt.load(str(ck))
    assert meta["tokens"] == 40 * 16
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.mark.parametrize("extra, pattern", [
    (["--c1-families", "gpt3", "--s1-tokens", "1024"], r"unknown c1_families \['gpt3'\]; choose from \['gemma2', 'gpt_neox', 'llama'\]"),
    (["--c1-families", "llama"], r"c1_families \['llama'\] run on S1's corpus: give s1_tokens > 0 too"),
])
def test_bench_c1_family_errors_are_one_line_and_exit_2(tmp_path, extra, pattern):
    one_line_error(cli("bench", "--out", tmp_path / "out", *extra), pattern)
    assert not (tmp_path / "out").exists()
