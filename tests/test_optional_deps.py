"""`import_optional`: an absent optional dependency is None, a broken one an error that names its cause
(an ImportError inside an installed package must never read as "not installed")."""

from __future__ import annotations

import pytest

from erasure_fast.optional_deps import OptionalDependencyError, import_optional


def _package(root, name: str, body: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)


def test_absent_is_none(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "ef_present", "")
    assert import_optional("ef_absent_module") is None
    assert import_optional("ef_absent_module.sub.deeper") is None  # a package above it is absent
    assert import_optional("ef_present.absent_submodule") is None
    assert import_optional("ef_present").__name__ == "ef_present"


@pytest.mark.parametrize("body, cause", [
    ("from ef_dependency_gone import x\n", "ModuleNotFoundError: No module named 'ef_dependency_gone'"),
    ("from json import NoSuchName\n", "ImportError: cannot import name 'NoSuchName' from 'json'"),
    ("raise RuntimeError('broken install')\n", "RuntimeError: broken install"),
])
def test_installed_but_broken_says_why(tmp_path, monkeypatch, body, cause):
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"ef_broken_{abs(hash(body))}"
    _package(tmp_path, name, body)
    with pytest.raises(OptionalDependencyError, match=f"^{name} is installed but cannot be imported: ") as info:
        import_optional(name)
    assert cause in str(info.value)
    assert not isinstance(info.value, ImportError)  # `except ImportError` ("absent") must not catch it
    assert info.value.__cause__ is not None


def test_the_cli_reports_a_broken_dependency_in_one_line_exit_1(monkeypatch, capsys):
    from erasure_fast import cli

    def broken(args, argv):
        raise OptionalDependencyError("datasets is installed but cannot be imported: ImportError: boom")

    monkeypatch.setattr(cli, "_dispatch", broken)
    assert cli.main(["backends"]) == 1
    assert capsys.readouterr().err == "erasure-fast: error: datasets is installed but cannot be imported: ImportError: boom\n"
    with pytest.raises(OptionalDependencyError):  # --debug: the traceback
        cli.main(["--debug", "backends"])


# A fresh interpreter in which the optional packages are absent for erasure_fast: a meta-path finder
# that answers "no module named ..." when a module of erasure_fast imports them, as an environment
# without the extras would. (TransformerLens's own dependencies -- accelerate imports psutil -- are
# its business: those imports pass.)
_WITHOUT_EXTRAS = r"""
import importlib.abc, sys
BLOCKED = {"matplotlib", "psutil", "xxhash"}
asked = []

def importer():
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen") or "importlib" in frame.f_code.co_filename):
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED and importer().startswith("erasure_fast"):
            asked.append((importer(), name))
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
import torch
import erasure_fast as ef
from erasure_fast.demo import planted_model

model, _ = planted_model(seed=0, dims=dict(d_model=64, n_layers=4, n_heads=8, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16))
res = ef.attribute(model, torch.randint(0, 50, (2, 6)), writers=["L0H1"])
assert res.dla.shape == (2, 6, 4, 8), res.dla.shape
assert not asked, asked
from erasure_fast.optional_deps import MissingExtraError
from erasure_fast.plotting import new_figure
try:
    new_figure((2, 2))
except MissingExtraError as e:
    print("MISSING:", e)
"""


def test_the_core_runs_without_the_extras_and_a_feature_names_its_extra():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MISSING: plotting" in out.stdout and "pip install 'erasure_fast[plots]'" in out.stdout, out.stdout


def test_require_optional_names_the_extra_and_keeps_broken_apart(tmp_path, monkeypatch):
    from erasure_fast.optional_deps import MissingExtraError, require_optional

    with pytest.raises(MissingExtraError, match=r"^the thing needs ef_absent_module, which is not installed: "
                                                r"pip install 'erasure_fast\[plots\]'$") as info:
        require_optional("ef_absent_module.sub", "plots", "the thing")
    assert isinstance(info.value, ImportError) and info.value.name == "ef_absent_module"
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "ef_broken_extra", "from json import NoSuchName\n")
    with pytest.raises(OptionalDependencyError, match="ef_broken_extra is installed but cannot be imported"):
        require_optional("ef_broken_extra", "plots", "the thing")
