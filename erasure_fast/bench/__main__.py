"""``python -m erasure_fast.bench SETTINGS_JSON``: the benchmark's own process (see `bench.child`)."""

import sys

from .child import main

sys.exit(main())
