"""featurekit: cached-feature extraction for image transfer learning.

images -> decode once -> per-backbone views -> frozen trunks -> HDF5 stores -> feature dataset -> head
"""

import os

# torch and scikit-learn each bundle a libgomp; with both loaded, threads that spin while waiting
# made small torch steps (the MLP head) 30x slower on a 2-core machine (0.39 -> 12 s per epoch in
# benchmarks/bench_head.py). Passive waiting removes that; it must be set before torch loads, and
# a value the user chose is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
