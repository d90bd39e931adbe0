"""benchmarks/scan_breakdown.py, run as documented on a small corpus: every part it reports is
found in the scan's profile and took time, and the files it writes agree with each other."""

from __future__ import annotations

import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _script():
    spec = importlib.util.spec_from_file_location("scan_breakdown", os.path.join(HERE, "..", "benchmarks", "scan_breakdown.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not on sys.path: the installed erasure_fast stays the one imported
    return module


def test_scan_breakdown_reports_every_part(tmp_path, capsys):
    script = _script()
    assert script.main(["--tokens", "2048", "--rounds", "1", "--batch-size", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "scan_breakdown.json").read_text())
    assert data["backend"] == "cpp" and data["tokens"] == 2048 and data["batches"] == 2
    parts = data["parts"]
    assert set(label for label, _, _ in script.PARTS) <= set(parts)
    for label, _, _ in script.PARTS:
        assert parts[label] > 0, label
    assert parts["forward (capture engine)"] > parts["fused attribution kernel"] > 0
    assert parts["all aggregation of a batch"] >= parts["ranking statistics: compiled pass"] + parts["PR histograms"]
    assert "| fused attribution kernel |" in (tmp_path / "scan_breakdown.md").read_text()
    assert "ratio" in capsys.readouterr().out
