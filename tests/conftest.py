"""Shared test configuration.

Torch runs single-threaded in tests: on this 2-core machine, tests run beside other processes, and
multi-threaded kernels on tiny tensors then spend far more time waiting for each other than computing
(measured: an 7×69 Gram matrix 22 µs with one thread, 1.8 ms with two under load).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def opacus_rdp():
    """Opacus' RDP analysis module (``opacus/accountants/analysis/rdp.py``: NumPy and SciPy only), loaded
    from its file without running ``opacus/__init__`` (which imports most of Opacus: about 8 s here).
    Skipped, with the reason, where Opacus (the ``test`` extra) is not installed."""
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("opacus is not installed (pip install -e '.[test]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "accountants" / "analysis" / "rdp.py"
    name = "_opacus_rdp_analysis"
    if name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
