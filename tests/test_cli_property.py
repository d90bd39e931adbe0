"""The command line against the class of bad input, not a list of cases: hypothesis generates corrupted
corpora (every format, wrong dtypes and shapes, ids outside the vocabulary, broken JSON lines, text that
is not UTF-8, truncated files), corrupted model checkpoints (config.json broken or holding wrong values,
truncated weights), output folders (fresh, a file, holding files no scan wrote, '~/...') and flag
values (out of range, wrong kind, misapplied), and runs ``erasure-fast scan`` on each. Every case must
end in one of two ways:

- exit 0 with a valid report (summary.json with the tokens scanned, report.md), or
- exit 2 with exactly one ``erasure-fast: error: ...`` line on stderr (the last; a "resuming ..." line
  may come before it) and no traceback;

and no file outside --out may be created, changed or removed (the corpus and the model included).

The command runs in this process (``erasure_fast.cli.main``, what the console script calls), so a case
costs a scan, not an interpreter start: N_CASES cases per run, derandomized (the same cases on every
run; EF_PROPERTY_CASES / EF_PROPERTY_SEED explore others). A traceback is an exception escaping main.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import write_tl_checkpoint

DIMS = dict(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64)
N_CASES = int(os.environ.get("EF_PROPERTY_CASES", "100"))
SEED = int(os.environ.get("EF_PROPERTY_SEED", "0"))
WORDS = [f"w{i}" for i in range(8)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """What every case starts from: a checkpoint, one with a tokenizer (for text), the tokenizer."""
    from erasure_fast.bench.hf_capture import word_tokenizer

    import matplotlib.font_manager  # noqa: F401 (matplotlib's own font cache, made once under the real HOME)

    root = tmp_path_factory.mktemp("property")
    write_tl_checkpoint(root / "model", DIMS, seed=11, fmt="safetensors")
    word_tokenizer(DIMS["d_vocab"] - 2).save_pretrained(str(root / "tokenizer"))
    shutil.copytree(root / "model", root / "tokmodel")
    cfg = json.loads((root / "model" / "config.json").read_text())
    (root / "tokmodel" / "config.json").write_text(json.dumps(dict(cfg, tokenizer_name=str(root / "tokenizer"))))
    return root


# -- what is generated ----------------------------------------------------------------------------------
# Each part of a case is valid more often than not (valid values are listed several times), so that
# about half the cases get past the checks into the scan, where late errors live.


def weighted(valid, invalid, p_valid: float = 0.9):
    """One of ``valid`` with probability ``p_valid``, else one of ``invalid``."""
    return st.floats(0, 1).flatmap(lambda u: st.sampled_from(valid if u < p_valid else invalid))


ints = st.integers(0, DIMS["d_vocab"] - 1)


@st.composite
def npy_corpus(draw):
    shape = draw(weighted([1, 2], [0, 3]).flatmap(lambda kind: {
        1: st.tuples(st.integers(64, 300)), 2: st.tuples(st.integers(1, 12), st.integers(8, 40)),
        0: st.tuples(st.integers(0, 12)), 3: st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))}[kind]))
    dtype = draw(weighted(["int64", "int32", "uint16", "uint32"], ["int8", "float32", "float64", "bool"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    high = draw(weighted([DIMS["d_vocab"]], [DIMS["d_vocab"] + 5]))  # ids outside the vocabulary, sometimes
    values = rng.integers(0, high, size=shape).astype(dtype)
    if dtype.startswith("float") and draw(st.booleans()):
        values = values + 0.5
    buf = io.BytesIO()
    np.save(buf, values)
    data = buf.getvalue()
    cut = draw(weighted([0], [1, 8, 100, len(data)]))  # truncated
    return "tokens.npy", data[: len(data) - cut]


@st.composite
def bin_corpus(draw):
    dtype = draw(st.sampled_from(["uint16", "uint32", "int32", "int64"]))
    values = np.array(draw(st.lists(ints, min_size=draw(weighted([64], [0, 5])), max_size=300)), dtype=dtype)
    data = values.tobytes()
    return "tokens.bin", data[: len(data) - draw(weighted([0], [1, 3]))] if data else data, dtype


words = st.lists(st.sampled_from(WORDS + ["w999", "é"]), min_size=1, max_size=20).map(" ".join)
bad_json_lines = st.sampled_from(['{"text": null}', '{"text": 17}', '{"text": ["w1"]}', '{"txt": "w1 w2"}', "not json",
                                  "[1, 2]", '"w1 w2"', "{", '{"text": "w1"} trailing'])


@st.composite
def text_corpus(draw):
    """A .jsonl or .txt file of words; in some, one line anywhere is broken or holds bytes that are not
    UTF-8 (early: refused before the scan; late: after batches, which are saved)."""
    name = draw(st.sampled_from(["c.jsonl", "c.txt"]))
    lines = draw(st.lists(words, min_size=draw(weighted([10], [0, 1])), max_size=60))
    if name.endswith(".jsonl"):
        lines = [json.dumps({"text": line}) for line in lines]
    data = [line.encode() for line in lines]
    if data and draw(st.integers(0, 9)) < 3:
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.one_of(bad_json_lines.map(str.encode) if name.endswith(".jsonl") else st.nothing(),
                                  st.sampled_from([b"\xff", b"w1 \xe9 w2", b"\xc3"])))
    return name, b"\n".join(data)


@st.composite
def dataset_corpus(draw):
    column = draw(weighted(["tokens"], ["ids"]))
    kind = draw(weighted(["int"], ["float", "nested", "scalar", "out of vocabulary"]))
    n = draw(st.integers(1, 6))
    rows = {"int": [list(range(i, i + 40)) for i in range(n)], "float": [[1.5, 321.7] * 20] * n,
            "nested": [[[1, 2]] * 20] * n, "scalar": list(range(n)),
            "out of vocabulary": [list(range(20, 60))] * n}[kind]
    return "ds", {column: rows}


corpora = st.one_of(npy_corpus(), npy_corpus(), npy_corpus(), bin_corpus(), text_corpus(), text_corpus(),
                    dataset_corpus(), st.sampled_from([("missing.npy", None), ("missing", None), ("plain_dir", "dir"),
                                                       ("c.csv", b"1,2")]))

broken_models = [
    "missing", "{", "[1, 2]", "null", {"n_layers": 0}, {"n_layers": -1}, {"n_heads": "3"}, {"d_vocab": 2.5},
    {"act_fn": 7}, {"act_fn": "potato"}, {"n_ctx": 8}, {"d_head": 7}, {"normalization": "Banana"},
    {"positional_embedding_type": "rotary"}, "drop n_layers", "truncate weights", "no weights",
]

FLAGS = {
    "--seq-len": weighted(["4", "8", "16"], ["-1", "0", "1", "17", "100", "1000000000", "x", "4.5"]),
    "--batch-size": weighted(["1", "3", "1000000"], ["0", "-2", "y"]),
    "--max-tokens": weighted(["16", "100", "1000000000000"], ["0", "1", "-5"]),
    "--top-k": weighted(["1", "5"], ["0", "1000000000", "1e3"]),
    "--checkpoint-every": weighted(["1", "7"], ["0"]),
    "--writers": weighted(["all", "L0H2", "L1H2", "L1H2,L0H0"], ["L0H2,L0H2", "L9H9", "", ",", "x", "3"]),
    "--prepend-bos": weighted(["0", "49"], ["-1", "50", "b"]),
    "--device": weighted(["cpu"], ["potato", "meta", "cuda:7", ""]),
    "--capture": weighted(["auto", "engine", "hooks"], ["both"]),
    "--rank-by": weighted(["es", "pr", "cos"], ["xx"]),
    "--column": weighted(["tokens"], ["ids", ""], 0.5),
    "--bin-dtype": weighted(["uint16", "int32", "int64"], ["float32"], 0.9),
    "--backend": weighted(["torch", "cpp"], ["gpu"]),
}
SWITCHES = ["--no-resume", "--force", "--no-progress"]

outs = weighted(["fresh", "nested/new", "~/out"], ["is a file", "holds a user file", "is the corpus"])


@st.composite
def cases(draw):
    corpus = draw(corpora)
    text = corpus[0].endswith((".txt", ".jsonl"))
    model = draw(weighted(["tokmodel" if text else "model"], broken_models + ["model" if text else "tokmodel"], 0.85))
    flags = draw(st.dictionaries(st.sampled_from(sorted(FLAGS)), st.nothing(), max_size=3).map(list))
    if draw(st.integers(0, 5)) > 0:
        flags.append("--seq-len")  # 1-D streams need it; text and datasets default to 1024, longer than these corpora
    values = {f: draw(FLAGS[f]) for f in dict.fromkeys(flags)}
    if corpus[0].endswith(".bin"):  # its own dtype mostly; another one, or none, sometimes
        values["--bin-dtype"] = draw(weighted([corpus[2]], ["uint16", "int32", "int64", None], 0.8))
        corpus = corpus[:2]
        if values["--bin-dtype"] is None:
            del values["--bin-dtype"]
    return dict(corpus=corpus, model=model, out=draw(outs), flags=values,
                switches=draw(st.lists(st.sampled_from(SWITCHES), unique=True)), twice=draw(st.integers(0, 5)) == 0)


# -- one case ---------------------------------------------------------------------------------------------


def _write_corpus(case_dir, corpus):
    name, data = corpus
    path = os.path.join(case_dir, name)
    if data is None:
        return path
    if data == "dir":
        os.makedirs(path)
    elif isinstance(data, dict):
        import datasets

        datasets.Dataset.from_dict(data).save_to_disk(path)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return path


def _write_model(case_dir, base, config):
    if config in ("model", "tokmodel"):
        return str(base / config)
    path = os.path.join(case_dir, "model")
    if config == "missing":
        return path
    shutil.copytree(base / "model", path)
    cfg_path, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    cfg = json.loads(open(cfg_path).read())
    if isinstance(config, dict):
        text = json.dumps(dict(cfg, **config))
    elif config == "drop n_layers":
        text = json.dumps({k: v for k, v in cfg.items() if k != "n_layers"})
    elif config in ("truncate weights", "no weights"):
        data = open(weights, "rb").read()
        os.remove(weights)
        if config == "truncate weights":
            open(weights, "wb").write(data[: len(data) // 2])
        text = json.dumps(cfg)
    else:
        text = config
    open(cfg_path, "w").write(text)
    return path


def _snapshot(root) -> dict:
    """{path: sha256 of the bytes (folders: None)} of everything under ``root``."""
    out = {}
    for folder, dirs, files in os.walk(root):
        out[folder] = None
        for name in files:
            p = os.path.join(folder, name)
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def _run(argv, cwd) -> tuple:
    """(exit status, stdout, stderr, escaped exception) of ``erasure-fast argv`` in this process."""
    from erasure_fast import cli

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status, escaped = cli.main(argv), None
            except SystemExit as e:  # argparse: --help, or an argument error (printed by the parser)
                status, escaped = e.code, None
            except BaseException as e:  # a traceback: the property fails with it below
                status, escaped = None, e
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue(), escaped


def _within(path, folder) -> bool:
    return (os.path.realpath(path) + os.sep).startswith(os.path.realpath(folder) + os.sep)


def _scans_to_write(path, out_dir, corpus) -> bool:
    """Whether the scan may create or change ``path``: inside --out (the corpus and a user's file
    aside), or a folder on the way to --out (created with it)."""
    if _within(path, corpus) or path.endswith("model.bin"):
        return False
    return _within(path, out_dir) or (os.path.isdir(path) and _within(out_dir, path))


def _check_outcome(status, stdout, stderr, escaped, out_dir, argv):
    where = f"\nargv: {argv}\nstderr: {stderr[-1500:]}"
    assert escaped is None, f"an exception escaped the command: {escaped!r}{where}"
    assert "Traceback" not in stderr, where
    if status == 0:
        meta = json.loads(open(os.path.join(out_dir, "summary.json")).read())["meta"]
        assert meta["tokens"] > 0 and meta["rows"] > 0, where
        assert "# Erasure scan report" in open(os.path.join(out_dir, "report.md")).read(), where
        assert "erasure-fast: error" not in stderr, where
    else:
        assert status == 2, f"exit status {status}{where}"
        lines = [line for line in stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("erasure-fast: error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], where  # informational lines ("resuming ...") may precede


@pytest.mark.filterwarnings("ignore")
def test_every_generated_command_either_scans_or_fails_in_one_line(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    counter = iter(range(10 ** 6))

    @seed(SEED)
    @settings(max_examples=N_CASES, derandomize=SEED == 0, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(cases())
    def run_case(case):
        case_dir = os.path.join(str(root), f"case{next(counter)}")
        home = os.path.join(case_dir, "home")
        os.makedirs(home)
        corpus = _write_corpus(case_dir, case["corpus"])
        model = _write_model(case_dir, base, case["model"])
        out = {"fresh": os.path.join(case_dir, "out"), "nested/new": os.path.join(case_dir, "a", "b", "out"),
               "is a file": os.path.join(case_dir, "out"), "holds a user file": os.path.join(case_dir, "out"),
               "~/out": "~/out", "is the corpus": corpus}[case["out"]]
        out_dir = os.path.join(home, "out") if out == "~/out" else out
        if case["out"] == "is a file":
            open(out, "w").write("mine")
        elif case["out"] == "holds a user file":
            os.makedirs(os.path.join(out, "checkpoint", "step1"))
            open(os.path.join(out, "checkpoint", "step1", "model.bin"), "w").write("weights")
        argv = ["scan", "--model", model, "--corpus", corpus, "--out", out]
        for flag, value in case["flags"].items():
            argv += [flag, value]
        argv += case["switches"]
        before = {**_snapshot(case_dir), **_snapshot(str(base))}
        environ = dict(os.environ)
        os.environ["HOME"] = home
        try:
            for _ in range(2 if case["twice"] else 1):  # a rerun: resumes, finds it done, or refuses the same way
                status, stdout, stderr, escaped = _run(argv, case_dir)
                _check_outcome(status, stdout, stderr, escaped, out_dir, argv)
        finally:
            os.environ.clear()
            os.environ.update(environ)
        after = {**_snapshot(case_dir), **_snapshot(str(base))}
        changed = [p for p in set(before) | set(after) if before.get(p, "gone") != after.get(p, "gone")
                   and not _scans_to_write(p, out_dir, corpus)]
        assert not changed, f"touched outside what the scan may write: {sorted(changed)}\nargv: {argv}"

    run_case()
