"""The locked environment: `make test` runs on exactly the versions of requirements/*.lock, the locks
agree with the package's own ranges, and tools/upstream.py (lock, drift report, pins) does what the
Makefile relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from conftest import REPO, installed_versions, load_tool, lock_path

upstream = load_tool("upstream")
LOCKS = {name: os.path.join(REPO, "requirements", f"{name}.lock") for name in ("tl4", "tl3")}


def _package_requirements():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
        import tomli as tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def test_installed_versions_are_the_lock():
    """Every pin of this environment's lock is installed at exactly its version (`make test-latest`
    deselects this test: its environments hold the newest releases on purpose)."""
    locked = upstream.read_lock(lock_path())
    here = installed_versions()
    wrong = [f"{name} {here.get(name, 'not installed')} (lock {version})" for name, version in locked.items()
             if here.get(name) != version]
    assert not wrong, f"this environment is not {os.path.relpath(lock_path(), REPO)}: {', '.join(wrong)}"


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_the_locks_are_exact_and_within_the_package_ranges(name):
    """Each lock pins exact versions only, satisfies every range the package states for what it pins,
    and leaves torch to TORCH_SPEC; the main environment's lock (tl4) holds every dependency."""
    locked = upstream.read_lock(LOCKS[name])
    assert "torch" not in locked and "erasure-fast" not in locked
    for req in _package_requirements():
        key = upstream.canonical(req.name)
        if key == "torch" or (req.marker is not None and not req.marker.evaluate()):
            continue
        if key in locked:
            assert req.specifier.contains(locked[key], prereleases=True), (name, str(req), locked[key])
        else:
            assert name != "tl4", f"tl4.lock lacks the package's dependency {req}"


def test_parse_pins_refuses_what_is_not_an_exact_pin(tmp_path):
    assert upstream.parse_pins(["# header", "", "Foo_Bar==1.2.3  # why", "baz==2.0+cpu"], "x") == {
        "foo-bar": "1.2.3", "baz": "2.0+cpu"}
    for bad in ("foo>=1", "foo @ file:///x.whl", "foo", "foo==1 ; python_version<'3'", "foo===1"):
        with pytest.raises(upstream.LockError, match=r"^x:2: not an exact pin"):
            upstream.parse_pins(["a==1", bad], "x")


def test_pins_and_differences():
    lock = LOCKS["tl4"]
    tl = upstream.read_lock(lock)["transformer-lens"]
    assert upstream.pins(lock, ["transformer_lens"]) == f"transformer_lens=={tl}"
    with pytest.raises(upstream.LockError, match="no pin for no-such-package"):
        upstream.pins(lock, ["no-such-package"])
    assert upstream.differences({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "3", "d": "4"}) == [
        ("b", "2", "3"), ("c", "3", "-"), ("d", "-", "4")]


def test_freeze_and_drift_report_of_this_environment(tmp_path):
    """freeze writes this environment as a lock (no torch, no erasure_fast); drift against it finds no
    version change, against an edited lock exactly the edits, and lists the recorded upstream facts."""
    lock = tmp_path / "env.lock"
    upstream.freeze(sys.executable, "requirements/x.in", str(lock))
    text = lock.read_text()
    assert text.startswith("# Exact versions for requirements/x.in") and "\ntorch==" not in text
    pins = upstream.read_lock(str(lock))
    assert pins and pins == {k: v for k, v in installed_versions().items() if k not in upstream.UNLOCKED}
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"findings": [{"test": "t.py::x", "finding": "X can be lifted"}]}))
    edited = tmp_path / "edited.lock"
    edited.write_text(text.replace(f"numpy=={pins['numpy']}", "numpy==0.0.1") + "gone-package==1.0\n")
    report = tmp_path / "drift.md"
    upstream.drift(str(report), ["a", str(lock), sys.executable, str(tmp_path / "missing.json"),
                                 "b", str(edited), sys.executable, str(facts)])
    md = report.read_text()
    a, b = md.split("## b:")
    assert "No version differs from the lock." in a and "the suite did not finish" in a
    assert f"| numpy | 0.0.1 | {pins['numpy']} |" in b and "| gone-package | 1.0 | - |" in b
    assert "- t.py::x: X can be lifted" in b


def test_tool_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.lock"
    bad.write_text("numpy>=1\n")
    tool = os.path.join(REPO, "tools", "upstream.py")
    for args in (["pins", str(bad), "numpy"], ["drift", str(tmp_path / "r.md"), "a", "b"], ["nonsense"]):
        proc = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = subprocess.run([sys.executable, tool, "pins", str(bad), "numpy"], capture_output=True, text=True)
    assert proc.stderr == f"upstream.py: error: {bad}:1: not an exact pin (name==version): 'numpy>=1'\n"
