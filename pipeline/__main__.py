import os
import sys

# Before torch loads: spin-waiting OpenMP threads collapse throughput when the cores are shared
# (measured 7x slower profiling on a busy 2-core machine); passive waiting costs nothing when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

sys.exit(main())
