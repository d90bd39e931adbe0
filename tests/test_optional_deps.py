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
