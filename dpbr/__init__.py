"""dpbr: data privacy and Byzantine resilience in distributed SGD.

Simulates a parameter server with ``n`` workers of which ``f`` are Byzantine while honest
workers protect their data (Gaussian noise, sparsification, quantization), measures the
variance-to-norm condition the theory rests on, and attacks the shared gradients with
gradient-inversion methods. See README.md.
"""

import os as _os
from importlib.metadata import PackageNotFoundError, version as _version

#: ``GOMP_SPINCOUNT`` set on import when the environment has none, read by GNU OpenMP (the runtime
#: of PyTorch's wheels) when torch is first imported — so it only takes effect when dpbr is imported
#: before torch, as the ``dpbr`` command and the workflow's jobs do. After every parallel region
#: the idle OpenMP workers busy-wait for this many ``pause`` instructions before sleeping; the
#: default of 300,000 kept the second core busy for several milliseconds after each operation on the
#: project's 2-core AMD CPU, so the per-worker noise drawn in parallel threads
#: (:func:`dpbr.privacy.mechanisms._fill`) could not use it. Measured side by side there (CNN, MNIST,
#: 2 torch threads, ``bench/bench_train.py``): the privacy phase at b = 100 12–18 → 10–12 ms, steps/s
#: at b = 10 +20 %, gradient phase no slower. A value in the environment is kept.
OPENMP_SPIN_COUNT = "30000"
_os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)

try:
    __version__ = _version("dpbr")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
