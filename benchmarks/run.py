"""Development entry to the benchmark harness: ``python -m benchmarks.run [erasure-fast bench options]``.

The harness itself lives in the package (`erasure_fast.bench`); this file only forwards arguments.
Examples:
    python -m benchmarks.run --shapes gelu-4l --sizes 8192            # K1 / K2 at 8192 tokens (C++ issue)
    python -m benchmarks.run --s1-tokens 65536 --shapes gelu-4l --sizes 8192   # plus the scan workload S1
    python -m benchmarks.run                                           # full CPU sweep, both shapes
"""

import sys

from erasure_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
