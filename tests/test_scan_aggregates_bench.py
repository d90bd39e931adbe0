"""benchmarks/scan_aggregates.py, run as documented on a one-row batch: every kernel the scan called
is timed on each variant, the torch null dots beside the compiled ones, and the table is written."""

from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
pytest.importorskip("erasure_fast._C", reason="the C++ extension is not built")


def _script():
    path = os.path.join(HERE, "..", "benchmarks", "scan_aggregates.py")
    spec = importlib.util.spec_from_file_location("scan_aggregates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not on sys.path: the installed erasure_fast stays the one imported
    return module


def test_scan_aggregates_times_every_kernel_on_each_path(tmp_path):
    script = _script()
    out = tmp_path / "table.md"
    text = script.main(["--rows", "1", "--paths", "auto,portable", "--rounds", "1", "--flush-mib", "1", "--out", str(out)])
    assert out.read_text() == text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "_f32 |" in line]
    assert {r[0].lstrip("| ") for r in rows} == set(script.KERNELS)
    assert any(r[0] == "| null_dots_f32" and r[1] == script.TORCH_NULL_DOTS for r in rows)
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0, r  # ms per batch, values per second
    assert any("this build, portable" in r[1] for r in rows)
    with pytest.raises(SystemExit):
        script.main(["--paths", "no_such_path"])
