"""Validating specs and grids needs no torch (the workflow's dry run depends on it), and the
deferred import of torch behaves like the real module once used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from dpbr._lazy import LazyModule

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_expanding_the_paper_grid_imports_neither_torch_nor_scipy():
    out = _run("""
        import sys, yaml
        from dpbr.report import grid
        from dpbr.spec import ReconSpec, RunSpec, VNSpec
        from dpbr import data
        cfg = yaml.safe_load(open("config/paper.yaml"))
        counts = [len(grid.expand(cfg.get(s), c, s)) for s, c in
                  (("train", RunSpec), ("vn", VNSpec), ("reconstruct", ReconSpec))]
        data.cache_paths("mnist", "data")
        heavy = sorted(m for m in ("torch", "scipy.special", "torchvision") if m in sys.modules)
        print(counts, heavy)
    """)
    assert out == "[900, 70, 418] []"


def test_bad_names_are_still_refused_without_torch():
    out = _run("""
        import sys
        from dpbr.errors import UsageError
        from dpbr.spec import RunSpec
        for bad in ({"gar": "kurm"}, {"attack": "littel"}, {"epsilon": 1.5}, {"model": "vgg"},
                    {"gar": "krum", "workers": 5, "byzantine": 2}):
            try:
                RunSpec.create(**bad)
            except UsageError as exc:
                print(exc.option)
        print("torch" in sys.modules)
    """)
    assert out.split() == ["--gar", "--attack", "--epsilon", "--model", "--byzantine", "False"]


def test_using_a_rule_imports_torch_and_rebinds_the_module_name():
    out = _run("""
        import sys
        from dpbr.robust import aggregators
        print(type(aggregators.torch).__name__, "torch" in sys.modules)
        import torch
        g = aggregators.get("mda")(torch.zeros(5, 3), 1)
        print(aggregators.torch is torch, g.shape[0])
    """)
    assert out.splitlines() == ["LazyModule False", "True 3"]


def test_lazy_module_forwards_and_rebinds_once():
    namespace: dict[str, object] = {}
    lazy = LazyModule("json", namespace)
    namespace["json"] = lazy
    assert repr(lazy) == "<lazy module 'json'>"
    assert lazy.dumps([1]) == "[1]"
    import json

    assert namespace["json"] is json  # rebound: later lookups skip the stand-in
    assert lazy.loads("2") == 2  # the stand-in itself still forwards


def test_lazy_module_leaves_a_rebound_name_alone():
    namespace: dict[str, object] = {"special": "user value"}
    lazy = LazyModule("math", namespace, "special")
    assert lazy.sqrt(4.0) == 2.0
    assert namespace["special"] == "user value"  # not ours to replace


def test_a_bad_option_is_reported_before_torch_is_imported():
    out = _run("""
        import contextlib, io, sys
        from dpbr.cli import main
        for args in (["train", "--gar", "kurm", "--out", "never.parquet"],
                     ["reconstruct", "--attack", "dlgg", "--out", "never.parquet"]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    main(args)
                except SystemExit as exc:
                    code = exc.code
            lines = err.getvalue().strip().splitlines()
            print(code, len(lines), lines[0].split(":")[2].strip())
        print("torch" in sys.modules)
    """)
    assert out.splitlines() == ["2 1 --gar", "2 1 --attack", "False"]
    assert not (REPO / "never.parquet").exists()


def test_importing_dpbr_sets_the_openmp_spin_count_unless_the_environment_has_one():
    out = _run("""
        import os
        os.environ.pop("GOMP_SPINCOUNT", None)
        import dpbr
        print(os.environ["GOMP_SPINCOUNT"], dpbr.OPENMP_SPIN_COUNT)
    """)
    assert out == "30000 30000"
    assert _run("""
        import os
        os.environ["GOMP_SPINCOUNT"] = "7"
        import dpbr
        print(os.environ["GOMP_SPINCOUNT"])
    """) == "7"
