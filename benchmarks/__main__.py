"""``python -m benchmarks``: run every case; see :mod:`benchmarks.run`."""

from benchmarks.run import main

raise SystemExit(main())
