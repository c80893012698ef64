"""The jobs layer: what every job sets up (threads set and restored) and who may import whom.

The thread tests run the commands in this process (``dpbr.cli.main``): a job that changes torch's
thread count and leaves it changed slows down, or speeds up, whatever the process runs next.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dpbr.cli import main
from dpbr.io import read_metadata

REPO = Path(__file__).resolve().parents[1]
VECTORS = "synthetic(classes=2,d=8,n=400,n_test=40)"
IMAGES = "synthetic(n=64,n_test=8,size=12)"


def _command(job: str, out: Path, threads: int, *, too_big: bool = False) -> list[str]:
    """A tiny run of ``job`` with ``--threads``; ``too_big``: a batch larger than the training split
    (refused once the data is loaded, i.e. after the job has set its threads)."""
    b = "1000" if too_big else "8"
    common = ["--device", "cpu", "--threads", str(threads), "--out", str(out), "--quiet"]
    if job == "train":
        return ["train", "--dataset", VECTORS, "--model", "logit", "--workers", "5", "--byzantine", "1",
                "--batch-size", b, "--steps", "3", "--eval-every", "0", *common]
    if job == "vn":
        return ["vn", "--dataset", VECTORS, "--model", "logit", "--samples", "16", "--bootstrap", "100",
                "--batch-size", b, *common]
    return ["reconstruct", "--dataset", IMAGES, "--iterations", "2", *common]


def _exit_code(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize("job", ["train", "vn", "reconstruct"])
def test_a_job_runs_with_its_threads_and_restores_the_callers_count(job, tmp_path):
    before = torch.get_num_threads()
    wanted = before + 1
    out = tmp_path / f"{job}.parquet"
    assert _exit_code(_command(job, out, wanted)) == 0
    assert read_metadata(out)["threads"] == wanted  # the job ran with --threads ...
    assert torch.get_num_threads() == before  # ... and gave the caller its own count back


@pytest.mark.parametrize("job", ["train", "vn"])
def test_a_job_refused_after_setting_its_threads_restores_the_callers_count(job, tmp_path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / f"{job}.parquet"
    assert _exit_code(_command(job, out, before + 1, too_big=True)) == 2
    assert "--batch-size: 1000 exceeds the 400 training examples" in capsys.readouterr().err
    assert torch.get_num_threads() == before and not out.exists()


def test_torch_threads_restores_the_count_when_the_block_raises():
    from dpbr.errors import UsageError
    from dpbr.jobs.common import torch_threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(before + 2) as used:
            assert used == before + 2 == torch.get_num_threads()
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None) as used:  # None: the count is left as it is
        assert used == before
    with pytest.raises(UsageError) as exc:
        with torch_threads(0):
            pass
    assert exc.value.option == "--threads" and torch.get_num_threads() == before


# ----------------------------------------------------------------------------------------------- #
# Layering: libraries never import a job or the command line


LIBRARIES = ("vn", "inversion", "robust", "privacy")
FORBIDDEN = ("dpbr.jobs", "dpbr.cli", "dpbr.__main__")


def _imported_modules(source: str, module: str) -> set[str]:
    """Every module an ``import`` / ``from … import`` anywhere in ``source`` (the text of ``module``,
    e.g. ``dpbr.vn.measure``) names, with relative imports resolved; ``from a import b`` yields both
    ``a`` and ``a.b`` (``b`` may be a submodule)."""
    package = module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _forbidden(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))


def test_the_import_finder_sees_every_form_of_import():
    source = ("import dpbr.cli\nfrom dpbr import jobs\nfrom dpbr.jobs.common import torch_threads\n"
              "def f():\n    from ..jobs import vn\n    import os\n")
    names = _imported_modules(source, "dpbr.inversion.case")
    assert _forbidden(names) == ["dpbr.cli", "dpbr.jobs", "dpbr.jobs.common", "dpbr.jobs.common.torch_threads",
                                 "dpbr.jobs.vn"]
    assert _forbidden(_imported_modules("from dpbr import data, models\nimport torch\n", "dpbr.vn.measure")) == []


def test_libraries_never_import_a_job_or_the_command_line():
    checked = []
    for lib in LIBRARIES:
        for path in sorted((REPO / "dpbr" / lib).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            bad = _forbidden(_imported_modules(path.read_text(encoding="utf-8"), module))
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"
            checked.append(module)
    for expected in ("dpbr.vn.measure", "dpbr.inversion.case", "dpbr.robust.aggregators", "dpbr.privacy.mechanisms"):
        assert any(m == expected or m.startswith(expected + ".") for m in checked), expected


def test_the_command_line_runs_commands_through_jobs_only():
    """``dpbr.cli`` imports, from dpbr, jobs and what parsing and the report commands need."""
    allowed = ("dpbr.jobs", "dpbr.errors", "dpbr.spec", "dpbr.report")
    names = {n for n in _imported_modules((REPO / "dpbr" / "cli.py").read_text(encoding="utf-8"), "dpbr.cli")
             if n == "dpbr" or n.startswith("dpbr.")}
    outside = sorted(n for n in names if not any(n == a or n.startswith(a + ".") for a in allowed))
    assert outside == [], outside
    assert {"dpbr.jobs.train", "dpbr.jobs.vn", "dpbr.jobs.reconstruct"} <= names
