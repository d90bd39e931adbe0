"""The repository's layout as imports see it: the backends' modules stay behind the backends package's
interface, and the Triton kernels (the top-level ``kernels/``) are ``erasure_fast.kernels`` wherever the
package comes from."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKEND_MODULES = {"cpp", "cpp_backend", "torch_ref", "triton"}


def _imported_modules(path: Path):
    """(line, dotted name) of every module an ``import`` / ``from ... import`` in ``path`` names,
    relative imports resolved against the file's package."""
    package = list(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, module
            for alias in node.names:  # `from ..backends import cpp`
                yield node.lineno, f"{module}.{alias.name}"


def test_no_module_outside_backends_imports_a_backend_module():
    backends = REPO / "erasure_fast" / "backends"
    offenders = []
    for path in sorted((REPO / "erasure_fast").rglob("*.py")):
        if backends in path.parents:
            continue
        for line, name in _imported_modules(path):
            parts = name.split(".")
            if parts[:2] == ["erasure_fast", "backends"] and len(parts) > 2 and parts[2] in BACKEND_MODULES:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not offenders, "import the backends' interface (erasure_fast.backends, .scan_kernels) instead:\n" + "\n".join(offenders)


def test_the_scan_reaches_its_kernels_through_the_interface():
    from erasure_fast.backends import cpp, scan_kernels
    from erasure_fast.scanning import aggregate, pair_stats

    assert aggregate.scan_kernel is scan_kernels.scan_kernel and pair_stats.scan_rows is scan_kernels.scan_rows
    import torch

    values = torch.zeros(3, 2, 4)
    assert scan_kernels.scan_rows(values) is values
    got, want = scan_kernels.scan_kernel("series_stats_batch", values), cpp.scan_kernel("series_stats_batch", values)
    assert (got is None) == (want is None)
    assert scan_kernels.scan_kernel("series_stats_batch", values.half()) is None  # no float16 entry


def test_the_registry_hands_out_backend_instances():
    import pytest
    import torch

    from erasure_fast.backends import available_backends, backend_instance, get_backend
    from erasure_fast.backends.base import Backend

    for name in available_backends():
        impl = backend_instance(name)
        assert isinstance(impl, Backend) and impl.name == impl.NAME == name
        assert backend_instance(name) is impl  # one instance per name
    assert get_backend("torch", torch.device("cpu")) is backend_instance("torch")
    with pytest.raises(NotImplementedError, match="the torch backend has no .*dla_fixed"):
        backend_instance("torch").dla_fixed(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.ones(1))
    assert backend_instance("torch").scan_kernel("series_stats_batch", torch.zeros(3, 2, 4)) is None
    with pytest.raises(TypeError):
        Backend()  # abstract: run and available are required


def test_the_torch_backend_compiles_its_chunk_function_through_the_interface():
    import pytest
    import torch

    from erasure_fast.backends import backend_instance
    from erasure_fast.contract import validate

    g = torch.Generator().manual_seed(0)
    inputs = validate(torch.randn(5, 4, 3, generator=g), torch.randn(4, 3, 6, generator=g), torch.randn(2, 6, generator=g),
                      torch.rand(5, generator=g) + 0.5, [0, 2])
    calls = []

    def compiler(fn):
        calls.append(fn)
        return fn

    ref = backend_instance("torch")
    compiled = ref.compiled(compiler)
    assert compiled is not ref and len(calls) == 1
    for a, b in zip(compiled.run(inputs), ref.run(inputs)):
        assert torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="the cpp backend has no"):
        backend_instance("cpp").compiled(compiler)


def test_the_contract_and_the_backends_import_one_way():
    """The backends take their types from `erasure_fast.backends.base`; none imports the contract."""
    offenders = [f"{path.relative_to(REPO)}:{line}"
                 for path in sorted((REPO / "erasure_fast" / "backends").glob("*.py"))
                 for line, name in _imported_modules(path) if name.startswith("erasure_fast.contract")]
    assert not offenders, offenders


# Run in a fresh interpreter: where erasure_fast and its kernels come from, and whether each kernel
# module's file exists (imported where triton is, else only found).
_PROBE = r"""
import importlib, importlib.util, json, os
import erasure_fast, erasure_fast.kernels as k
mods = {}
for name in ("dla_table", "fused_attribution", "triton_common"):
    full = "erasure_fast.kernels." + name
    if importlib.util.find_spec("triton") is not None:
        mods[name] = importlib.import_module(full).__file__
    else:
        mods[name] = importlib.util.find_spec(full).origin
print(json.dumps(dict(package=erasure_fast.__file__, kernels=k.__file__, path=list(k.__path__), modules=mods,
                      cpp=erasure_fast.available_backends()["cpp"].available)))
"""


def _probe(cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, path in got["modules"].items():
        assert os.path.isfile(path) and Path(path).name == f"{name}.py", got
        assert Path(path).parent == Path(got["path"][0]), got
    return got


def test_kernels_import_from_a_source_checkout(tmp_path):
    got = _probe(tmp_path, pythonpath=REPO)
    assert Path(got["package"]).parent == REPO / "erasure_fast", got
    assert Path(got["path"][0]) == REPO / "kernels", got  # the files being edited, no reinstall


def test_kernels_import_from_a_checkout_with_the_extension_built_in_place(tmp_path):
    """The checkout's layout (erasure_fast/ beside kernels/) with the compiled extension next to the
    package's modules, as an in-place build leaves it: both backends' code comes from there."""
    import shutil

    import erasure_fast

    built = sorted(Path(erasure_fast.__file__).parent.glob("_C.*"))
    built = [p for p in built if p.suffix in (".so", ".pyd")]
    if not built:
        import pytest

        pytest.skip("the installed package has no compiled extension to place")
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "erasure_fast", checkout / "erasure_fast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", checkout / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(built[0], checkout / "erasure_fast" / built[0].name)
    got = _probe(tmp_path, pythonpath=checkout)
    assert Path(got["package"]).parent == checkout / "erasure_fast" and got["cpp"], got
    assert Path(got["path"][0]) == checkout / "kernels", got


def test_kernels_import_from_the_installed_package(tmp_path):
    got = _probe(tmp_path)
    package = Path(got["package"]).parent
    # a wheel: erasure_fast/kernels/; an editable install: the checkout's kernels/
    assert Path(got["path"][0]) in (package / "kernels", package.parent / "kernels"), got


def test_the_checkout_root_shadows_no_kernels_distribution():
    """From the checkout's root (the current directory first on sys.path) the top-level kernels/ is no
    regular package: an installed ``kernels`` distribution (transformers imports it) still wins, and
    transformers and TransformerLens import."""
    probe = ("import importlib.util, transformers, transformer_lens\n"
             "s = importlib.util.find_spec('kernels')\n"
             "print(None if s is None else s.origin)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = proc.stdout.strip().splitlines()[-1]
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert origin in ("None", "") or not origin.startswith(str(REPO / "kernels")), origin
