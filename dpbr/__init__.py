"""dpbr: data privacy and Byzantine resilience in distributed SGD.

Simulates a parameter server with ``n`` workers of which ``f`` are Byzantine while honest
workers protect their data (Gaussian noise, sparsification, quantization), measures the
variance-to-norm condition the theory rests on, and attacks the shared gradients with
gradient-inversion methods. See README.md.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("dpbr")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
