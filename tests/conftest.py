"""Shared test configuration.

Torch runs single-threaded in tests: on this 2-core machine, tests run beside other processes, and
multi-threaded kernels on tiny tensors then spend far more time waiting for each other than computing
(measured: an 7×69 Gram matrix 22 µs with one thread, 1.8 ms with two under load).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
