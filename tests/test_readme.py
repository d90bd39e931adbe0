"""The README's and the docs pages' code runs as written: their Python blocks, in order (the README,
then the pages of mkdocs.yml's nav; a block shown on two pages runs once), in one fresh interpreter,
and their shell commands one by one, in a scratch folder with small stand-ins -- a small
TransformerLens model for ``model``, a local Hugging Face cache holding a small
``NeelNanda/GELU_4L512W_C4_Code`` (so ``--model gelu-4l`` resolves offline, as it would with the real
weights cached) and a ``tokens.npy``. Commands that set up a machine or run for long are listed in
NOT_RUN with the reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_loading import fake_hf_cache

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# GELU-4L's layout (4 layers x 8 heads, so the paper's L2H2-L2H7 exist), small widths.
FAKE_GELU_4L = dict(n_layers=4, n_heads=8, d_head=8, d_model=64, d_mlp=64, d_vocab=200, n_ctx=1024)
# Commands the README and the docs pages show that this test does not run, and why (any other command is run).
NOT_RUN = {
    "make demo": "set-up + `erasure-fast demo`, which is run here as the docs show it",
    "make test": "what CI itself runs (.ci/run)",
    "make bench": "the full benchmark (an hour on 2 cores); the harness runs end to end at small sizes in test_bench.py",
    "make bench-quick": "K1/K2 at 8,192 tokens for every provider (minutes); the harness is tested in test_bench.py",
    "EF_DEVICE_OUT=benchmarks/results/gpu bash benchmarks/device_check.sh": "needs the GPU machine",
    "python benchmarks/cpu_check.py": "about 8 minutes of benchmarks; test_cpu_paths.py checks its plan (a dry run) "
                                      "and its summary of committed runs",
}
PRELUDE = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import torch
from conftest import build_model
# the README's `model` and `tokens`: a small TransformerLens model of the installed major version
model = build_model(n_layers=2, n_heads=4, d_head=8, d_model=32, d_mlp=64, d_vocab=200, n_ctx=1024, seed=3)
tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
# the Model families block's `hf_path` and `hf_tokens`: a tiny random GPT-NeoX (Pythia's layout) saved offline
import tempfile
from hf_families import save_family, VOCAB
hf_path = save_family("GPTNeoXForCausalLM", tempfile.mkdtemp())
hf_tokens = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
"""


def pages():
    """The README, then every page of the docs site's nav (mkdocs.yml) that is not a generated report."""
    nav = re.findall(r"^\s*- [^:]+: (\S+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), flags=re.M)
    return [REPO / "README.md"] + [REPO / "docs" / p for p in nav if "/" not in p]


def page_blocks(page: Path, language: str):
    return [m.group(1) for m in re.finditer(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)]


def blocks(language: str):
    """Every ``language`` block of the pages, in order; a block an earlier page showed is left out."""
    out = []
    for page in pages():
        out += [b for b in page_blocks(page, language) if b not in out]  # the README's API block is also the API page's
    return out


def page_commands(page: Path):
    out = []
    for block in page_blocks(page, "bash"):
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line and not line.startswith("#"):
                out.append(line)
    return out


def all_commands():
    """Every command of the pages, in order (a page may run one twice: a scan that finds itself done); a
    command an earlier page showed is left out (`make demo` is in the README and on the install page)."""
    out = []
    for page in pages():
        out += [c for c in page_commands(page) if c not in out]
    return out


def commands():
    return [c for c in all_commands() if c not in NOT_RUN]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    (root / "hf").mkdir()
    fake_hf_cache(root / "hf", "NeelNanda/GELU_4L512W_C4_Code", FAKE_GELU_4L)
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 200, size=(6, 256)).astype(np.int32))
    return root


def env_for(root: Path) -> dict:
    # BROWSER: `erasure-fast view` "opens" the page with `true`, never a real browser on a desktop
    env = dict(os.environ, HF_HUB_CACHE=str(root / "hf"), HF_HUB_OFFLINE="1", BROWSER="true")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def test_readme_has_code_to_run_and_skips_only_what_is_listed():
    assert len(pages()) >= 10 and all(p.is_file() for p in pages())
    assert len(blocks("python")) >= 5 and len(commands()) >= 8
    readme = (REPO / "README.md").read_text()
    assert "```bash\nmake demo" in readme and "\nmake test " in readme and len(readme) <= 15000
    assert sorted(c for c in all_commands() if c in NOT_RUN) == sorted(NOT_RUN)


def test_python_blocks_run_in_order(workdir):
    code = PRELUDE + "\n".join(f"print('--- python block {i}', flush=True)\n{b}" for i, b in enumerate(blocks("python")))
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env_for(workdir), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (workdir / "scan_py" / "report.md").exists()


@pytest.mark.parametrize("command", commands())
def test_shell_command_runs(workdir, command):
    proc = subprocess.run(["bash", "-c", command], cwd=workdir, env=env_for(workdir), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
