"""Gradient privacy: mechanisms applied by honest workers and privacy accounting.

``gaussian_sigma(clip, batch_size, epsilon, delta)`` calibrates the study's Gaussian noise;
:mod:`dpbr.privacy.mechanisms` holds clip, Gaussian noise, sparsification, top-k and quantization
(``mechanisms.get(name, **params)``, ``mechanisms.names()``, ``mechanisms.compose(...)``);
:mod:`dpbr.privacy.accounting` gives the per-step guarantee and the RDP-composed ε of a run.
"""

from dpbr.privacy import accounting, mechanisms
from dpbr.privacy.mechanisms import gaussian_sigma

__all__ = ["gaussian_sigma", "mechanisms", "accounting"]
