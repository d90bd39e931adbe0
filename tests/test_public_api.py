"""Public names work from a fresh interpreter, no module is shadowed by a function of the same name,
the package has no import cycles and no private cross-module imports, and the contract ships."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import erasure_fast

PACKAGE = Path(erasure_fast.__file__).parent
REPO = Path(__file__).resolve().parents[1]


def fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")


def test_every_public_name_resolves_in_a_fresh_interpreter():
    proc = fresh(
        "import erasure_fast as ef\n"
        "missing = [n for n in ef.__all__ if not hasattr(ef, n)]\n"
        "assert not missing, missing\n"
        "assert callable(ef.scan) and callable(ef.attribute) and callable(ef.available_backends)\n"
        "from erasure_fast import scan, ScanResult, attribute, logit_attrs_heads, build_dla_table, load_model\n"
        "assert scan is ef.scan and ScanResult.__name__ == 'ScanResult'\n"
        "print('ok')\n"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_no_subpackage_is_shadowed_by_a_function():
    """`import erasure_fast.backends as b` gives the package; importing a subpackage leaves the
    top-level functions alone (once erasure_fast.scanning was imported, ef.scan stays a function)."""
    proc = fresh(
        "import types, erasure_fast as ef\n"
        "import erasure_fast.backends as b, erasure_fast.scanning, erasure_fast.paper, erasure_fast.bench\n"
        "assert isinstance(b, types.ModuleType) and hasattr(b, 'get_backend'), b\n"
        "assert isinstance(ef.scan, types.FunctionType), ef.scan\n"
        "assert isinstance(ef.paper, types.ModuleType) and callable(ef.paper.causal_check)\n"
        "print('ok')\n"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    clashes = [n for n in erasure_fast.__all__ if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").exists()]
    assert not clashes, f"public names that are also module names: {clashes}"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(name: str, path: Path):
    """(target module, imported names) of every import statement, module-level or in functions."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_no_import_cycles_and_no_private_cross_module_imports():
    modules = dict(_modules())
    graph = {m: set() for m in modules}
    private = []
    for m, path in modules.items():
        if path.name == "__init__.py":
            continue  # a package's __init__ re-exports its modules: edges into the package, not cycles
        for mod, names in _imports(m, path):
            if not mod.startswith("erasure_fast"):
                continue
            for n in names:
                target = f"{mod}.{n}" if f"{mod}.{n}" in modules else mod
                dunder = n.startswith("__") and n.endswith("__")  # __version__ is public by convention
                is_extension = n == "_C"  # the compiled module itself, not a private name of a module
                if n.startswith("_") and not (dunder or is_extension) and target == mod and mod != m:
                    private.append(f"{m}: from {mod} import {n}")
                if target in graph and target != m:
                    graph[m].add(target)
            if not names and mod in graph:
                graph[m].add(mod)
    assert not private, private
    # packages' __init__ modules are leaves here; a cycle among the other modules is a real one
    graph = {m: {t for t in ts if modules[t].name != "__init__.py"} for m, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_no_parameter_shadows_an_imported_name():
    """A function's parameter never takes the name of something its module (or the function) imports:
    `capture` the mode is not `capture` the function (attribution.py imports that as `hook_capture`)."""
    def imported(body) -> set:
        return {(a.asname or a.name).split(".")[0] for n in body if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}

    clashes = []

    def visit(node, outer: set, path: Path):
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = n.args
                params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
                inner = outer | imported(m for m in ast.walk(n))
                clashes.extend(f"{path.relative_to(PACKAGE.parent)}:{n.lineno} {n.name}({p})"
                               for p in sorted(params & inner))
                visit(n, inner, path)
            else:
                visit(n, outer, path)

    for _, path in _modules():
        tree = ast.parse(path.read_text())
        visit(tree, imported(tree.body), path)
    assert not clashes, clashes


def test_the_contract_ships_and_docstrings_point_to_it():
    assert (REPO / "docs" / "math.md").is_file()
    text = (REPO / "docs" / "math.md").read_text()
    assert "## Direct logit attribution" in text and "## Erasure measures" in text
    sources = [*(REPO / "erasure_fast").rglob("*.py"), *(REPO / "kernels").rglob("*.py"), *(REPO / "csrc").glob("*.[ch]*")]
    stale = [str(p.relative_to(REPO)) for p in sources if "shared/erasure-math.md" in p.read_text()]
    assert not stale, f"docstrings pointing outside the repository: {stale}"
    assert "docs/math.md" in erasure_fast.__doc__ and "docs/math.md" in erasure_fast.contract.__doc__


def test_runtime_dependencies_are_declared():
    """The core needs torch, numpy and transformer_lens (and what those bring); every optional package a
    feature imports on use is declared in the extra that feature names (`optional_deps`)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda d: re.split(r"[\s;<>=!~\[]", d.strip(), maxsplit=1)[0].lower()  # noqa: E731
    core = {name(d) for d in project["dependencies"]}
    extras = {extra: {name(d) for d in deps} for extra, deps in project["optional-dependencies"].items()}
    for used in ("torch", "numpy", "transformer-lens", "packaging", "pandas", "tqdm"):
        assert used in core, used
    for used, extra in (("psutil", "bench"), ("matplotlib", "plots"), ("pyarrow", "scan"), ("xxhash", "scan"),
                        ("safetensors", "hf"), ("datasets", "hf"), ("triton", "gpu"), ("nnsight", "nnsight")):
        assert used in extras[extra], (used, extra)
    assert extras["all"] == {"erasure_fast"} and all(e in project["optional-dependencies"]["all"][0]
                                                     for e in ("gpu", "scan", "plots", "bench", "hf", "nnsight"))


def test_pandas_and_tqdm_are_imported_on_use():
    """No module imports pandas or tqdm when it is imported (the scan's summary and the paper's tables,
    the progress bar import them on use), so `import erasure_fast` and `attribute` load no pandas.
    tqdm is not checked at run time: torch imports it itself (torch.hub); so does transformer_lens,
    pandas too, where it is imported."""
    def module_level_imports(node):
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(n, ast.Import):
                yield from (a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and not n.level:
                yield n.module
            else:
                yield from module_level_imports(n)

    eager = [f"{m}: {imp}" for m, path in _modules() for imp in module_level_imports(ast.parse(path.read_text()))
             if imp.split(".")[0] in ("pandas", "tqdm")]
    assert not eager, eager
    proc = fresh("import sys, erasure_fast as ef\n"
                 "ef.attribute, ef.scan, ef.fused_attribution\n"
                 "import erasure_fast.scanning, erasure_fast.paper, erasure_fast.cli\n"
                 "print('transformer_lens' in sys.modules, 'pandas' in sys.modules)\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_tl, with_pandas = proc.stdout.split()
    assert with_tl == "True" or with_pandas == "False", proc.stdout


def test_a_source_checkout_reports_what_it_lacks():
    """Without `pip install .` the C++ extension is missing (unless built in place): the backend says so
    instead of claiming to be available. The Triton kernels (kernels/ -> erasure_fast.kernels) are
    there: under the interpreter the Triton backend runs from the checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c",
                           "import erasure_fast as ef; assert ef.__file__.startswith(%r), ef.__file__\n"
                           "b = ef.available_backends()\n"
                           "print(b['triton'].available, b['triton'].detail)\n"
                           "print(b['cpp'].available, b['cpp'].detail)" % str(REPO)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    triton_line, cpp_line = proc.stdout.strip().splitlines()
    if "not importable" not in triton_line:  # triton itself is installed here
        assert triton_line.startswith("True") and "interpreter" in triton_line, triton_line
    if not list((REPO / "erasure_fast").glob("_C*")):  # no extension built in place
        assert cpp_line.startswith("False") and "not built" in cpp_line, cpp_line
