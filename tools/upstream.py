"""The locked upstream versions and their drift (the Makefile's `lock`, `test-latest`, `device-wheels`).

    python tools/upstream.py freeze PYTHON SOURCE.in OUT.lock [UPLOADED_BEFORE]
        OUT.lock: every distribution installed in PYTHON's environment at its exact version (pip
        constraints), but torch (the Makefile's TORCH_SPEC) and erasure_fast itself.
    python tools/upstream.py drift REPORT.md (NAME LOCK PYTHON FACTS.json)...
        REPORT.md: per environment, every version PYTHON has that differs from LOCK, and the upstream
        facts the test suite found changed there (FACTS.json, written by tests/conftest.py when
        EF_UPSTREAM_REPORT is set); printed too.
    python tools/upstream.py pins LOCK NAME...
        NAME==VERSION of each NAME as LOCK has it, on one line.

Standard library only: it runs under whatever python3 makes the environments.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from typing import Dict, List, Tuple

# Not locked: torch is chosen by the Makefile's TORCH_SPEC (a CPU build here, CUDA elsewhere), and
# erasure_fast is the package under test.
UNLOCKED = ("torch", "erasure-fast")


class LockError(ValueError):
    pass


def canonical(name: str) -> str:
    """The PEP 503 form of a distribution name (``Transformer_Lens`` -> ``transformer-lens``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines, where: str) -> Dict[str, str]:
    """{canonical name: version} of ``name==version`` lines (comments and blank lines skipped). Any
    other form -- a range, a direct reference (``name @ url``) -- is not a pin: LockError."""
    pins: Dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)", line)
        if m is None:
            raise LockError(f"{where}:{number}: not an exact pin (name==version): {raw.strip()!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def read_lock(path: str) -> Dict[str, str]:
    with open(path) as f:
        return parse_pins(f, path)


def installed(python: str) -> Dict[str, str]:
    """{canonical name: version} of what ``python``'s environment has (pip freeze --all), without the
    unlocked distributions; a local version label (``+cpu``) is kept."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    kept = [line for line in out if canonical(re.split(r"[=@ ]", line, 1)[0]) not in UNLOCKED]
    return parse_pins(kept, f"pip freeze of {python}")


def freeze(python: str, source: str, out: str, uploaded_before: str = "") -> None:
    pins = installed(python)
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    window = f" (releases uploaded before {uploaded_before})" if uploaded_before else " (the newest releases)"
    header = [f"# Exact versions for {source}: the Makefile installs them as pip constraints.",
              f"# Made by `make lock` on {datetime.date.today().isoformat()}{window} with Python {version} "
              f"on {platform.system()} {platform.machine()}.",
              "# torch is not here: it comes from the Makefile's TORCH_SPEC."]
    if not os.path.basename(source).startswith("tl"):  # a tool's environment (docs, lint): no torch at all
        header = header[:2]
    body = [f"{name}=={pins[name]}" for name in sorted(pins)]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(header + body) + "\n")
    os.replace(tmp, out)
    print(f"{out}: {len(body)} pins")


def differences(locked: Dict[str, str], now: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """(name, locked version or "-", version now or "-") for every distribution that differs."""
    names = sorted(set(locked) | set(now))
    return [(n, locked.get(n, "-"), now.get(n, "-")) for n in names if locked.get(n) != now.get(n)]


def drift_section(name: str, lock: str, python: str, facts_path: str) -> List[str]:
    lines = [f"## {name}: newest releases vs {lock}", ""]
    changed = differences(read_lock(lock), installed(python))
    if changed:
        lines += ["| package | lock | newest |", "|---|---|---|"] + [f"| {n} | {a} | {b} |" for n, a, b in changed]
    else:
        lines.append("No version differs from the lock.")
    lines.append("")
    if not os.path.exists(facts_path):
        lines.append(f"Upstream facts: none recorded ({facts_path} is missing: the suite did not finish).")
        return lines + [""]
    with open(facts_path) as f:
        facts = json.load(f)
    findings = facts.get("findings", [])
    lines.append(f"Upstream facts the tests found changed ({len(findings)}):" if findings else
                 "Upstream facts: every fact the tests state still holds on these releases.")
    lines += [f"- {item['test']}: {item['finding']}" for item in findings]
    return lines + [""]


def drift(report: str, groups: List[str]) -> None:
    if len(groups) % 4:
        raise LockError("drift takes REPORT.md followed by groups of NAME LOCK PYTHON FACTS.json")
    lines = [f"# Upstream drift ({datetime.date.today().isoformat()})", ""]
    for i in range(0, len(groups), 4):
        lines += drift_section(*groups[i:i + 4])
    os.makedirs(os.path.dirname(report) or ".", exist_ok=True)
    with open(report, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def pins(lock: str, names: List[str]) -> str:
    locked = read_lock(lock)
    missing = [n for n in names if canonical(n) not in locked]
    if missing:
        raise LockError(f"{lock}: no pin for {', '.join(missing)}")
    return " ".join(f"{n}=={locked[canonical(n)]}" for n in names)


def main(argv: List[str]) -> int:
    try:
        if len(argv) in (4, 5) and argv[0] == "freeze":
            freeze(*argv[1:])
        elif len(argv) >= 2 and argv[0] == "drift":
            drift(argv[1], argv[2:])
        elif len(argv) >= 3 and argv[0] == "pins":
            print(pins(argv[1], argv[2:]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (LockError, OSError, subprocess.CalledProcessError) as e:
        print(f"upstream.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
