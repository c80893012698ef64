"""Several training cells in one process: seed lists, cell files, and the workflow's job plan.

Nothing here imports torch, so the command line checks its options and the workflow plans its jobs
(while Snakemake parses the Snakefile) before any heavy import.

- :func:`parse_seeds` reads ``--seed`` values such as ``1-5``, ``1,2,3`` or ``1-3,7``.
- :func:`seed_path` puts a seed into an ``--out`` / ``--checkpoint-dir`` template (``{seed}``).
- :func:`read_cells` reads the cell list of ``dpbr train-many`` (YAML or JSON).
- :func:`plan` splits the training cells of the workflow into per-cell jobs and bundles, and
  :class:`Bundle` names a bundle's job so that any process parsing the workflow (the main one, or a
  cluster job's) rebuilds the same rule from its name.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dpbr.errors import UsageError
from dpbr.spec import RunSpec

__all__ = ["BATCH_MODES", "Bundle", "CellJob", "MAX_BUNDLE", "MAX_SEEDS", "SCALAR_FIELDS", "chunks", "cells_json", "compatibility_key",
           "parse_seeds", "plan", "read_cells", "seed_path", "seeds_key"]

#: Values of ``--batch``: ``auto`` batches the cells the batched engine can run together, ``on`` runs
#: every group (also of one cell) with it, ``off`` runs the cells one after another.
BATCH_MODES = ("auto", "on", "off")

#: Most seeds one ``--seed`` value may name (every seed is one output file).
MAX_SEEDS = 10_000

#: Spec fields that may differ between the cells of one batched group (besides the attack's numeric
#: parameters): the seed and the scalars of privacy, clipping and optimisation.
SCALAR_FIELDS = RunSpec.BATCH_SCALARS

#: Most cells of one workflow bundle: a bundle's rule name holds one bit per cell of its group (in hex),
#: and the SLURM plugin names a log folder after it, which must stay a valid file name.
MAX_BUNDLE = 256

_SEED_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seeds(text: Any, option: str = "--seed") -> list[int]:
    """The seeds named by ``text``: ``"3"``, ``"1,2,3"``, ``"1-5"`` (inclusive) or a mix ``"1-3,7"``.

    Returns the seeds in the order given. Refused, as a one-line :class:`UsageError` naming
    ``option``: an empty value, a non-integer or negative item, a decreasing range (``5-1``), a seed
    named twice, and more than :data:`MAX_SEEDS` seeds.
    """
    allowed = "allowed: a seed, a range a-b with a <= b, or a comma-separated list of them (e.g. 1-5 or 1,2,7)"
    items = str(text).split(",")
    if not str(text).strip() or any(not item.strip() for item in items):
        raise UsageError(option, f"empty seed in {str(text)!r}; {allowed}")
    seeds: list[int] = []
    for item in items:
        match = _SEED_ITEM.match(item)
        if not match:
            raise UsageError(option, f"{item.strip()!r} is not a seed; {allowed}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise UsageError(option, f"range {item.strip()!r} decreases; {allowed}")
        if len(seeds) + high - low + 1 > MAX_SEEDS:
            raise UsageError(option, f"{str(text)!r} names more than {MAX_SEEDS} seeds")
        seeds.extend(range(low, high + 1))
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise UsageError(option, f"seed {seed} is named twice in {str(text)!r}; {allowed}")
        seen.add(seed)
    return seeds


def seed_path(template: str | Path | None, seed: int, several: bool, option: str) -> Path | None:
    """``template`` with ``{seed}`` replaced by ``seed`` (None stays None).

    With ``several`` seeds the template must contain ``{seed}`` (each seed writes its own file);
    otherwise a UsageError naming ``option``.
    """
    if template is None:
        return None
    text = str(template)
    if several and "{seed}" not in text:
        raise UsageError(option, f"{text!r} must contain {{seed}} when several seeds are given (one file per seed)")
    return Path(text.replace("{seed}", str(seed)))


# ----------------------------------------------------------------------------------------------- #
# dpbr train-many: the cell list


@dataclass(frozen=True)
class CellJob:
    """One cell of a multi-cell job: its spec, its output file and its checkpoints (if any)."""

    spec: RunSpec
    out: Path
    checkpoint_steps: frozenset[int] = frozenset()
    checkpoint_dir: Path | None = None


#: Keys of a ``train-many`` cell besides the RunSpec fields.
CELL_EXTRA_KEYS = ("out", "checkpoint_steps", "checkpoint_dir")


def _steps(value: Any, where: str) -> frozenset[int]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return frozenset()
    items = value if isinstance(value, (list, tuple)) else str(value).replace(";", ",").split(",")
    try:
        return frozenset(int(str(v).strip()) for v in items if str(v).strip())
    except ValueError:
        raise UsageError(where, f"expected step numbers such as [0, 500, 1000], got {value!r}") from None


def read_cells(source: str | Path, root: str | Path = "results") -> list[CellJob]:
    """The cells of a ``dpbr train-many`` file (``-``: standard input): a YAML (or JSON) list of mappings.

    Each mapping holds RunSpec fields (as in the workflow's ``train:`` grid: ``gar``, ``epsilon``,
    ``batch_size``, ...; missing ones take ``dpbr train``'s defaults) and optionally ``out`` (default
    ``<root>/train/<cell id>.parquet``), ``checkpoint_steps`` and ``checkpoint_dir``. Every cell is
    validated here; an error names the file, the cell's index and the key, in one line. Two cells
    with the same output file are refused.
    """
    import yaml

    name = "CELLS" if str(source) == "-" else str(source)
    if str(source) == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError("CELLS", f"{name!r} is not a readable file (a YAML list of cells, or - for standard input)")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(name, f"not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, list) or not data:
        raise UsageError(name, "expected a non-empty list of cells (mappings of train options such as gar, epsilon, seed, out)")
    names = [f.name for f in fields(RunSpec)]
    cells: list[CellJob] = []
    outs: dict[Path, int] = {}
    for i, entry in enumerate(data):
        where = f"{name}[{i}]"
        if not isinstance(entry, Mapping):
            raise UsageError(where, f"must be a mapping of train options, got {entry!r}")
        unknown = sorted(str(k) for k in entry if k not in names and k not in CELL_EXTRA_KEYS)
        if unknown:
            raise UsageError(f"{where}.{unknown[0]}", f"unknown key; allowed: {', '.join([*names, *CELL_EXTRA_KEYS])}")
        options = {k: v for k, v in entry.items() if k in names}
        for key in ("epsilon", "clip", "sparsify", "quantize"):
            if key in options and options[key] is None:
                options[key] = "none"
        try:
            spec = RunSpec.create(**options)
        except UsageError as exc:
            raise UsageError(f"{where}.{exc.option.lstrip('-').replace('-', '_')}", exc.message) from None
        out = Path(str(entry["out"])) if entry.get("out") is not None else spec.path(root)
        key = Path(out).resolve()
        if key in outs:
            raise UsageError(f"{where}.out", f"{str(out)!r} is also the output of cell {outs[key]}")
        outs[key] = i
        ckpt_dir = entry.get("checkpoint_dir")
        cells.append(CellJob(spec, out, _steps(entry.get("checkpoint_steps"), f"{where}.checkpoint_steps"),
                             Path(str(ckpt_dir)) if ckpt_dir is not None else None))
    return cells


def cells_json(specs: Iterable[RunSpec], outs: Iterable[str | Path]) -> str:
    """A ``train-many`` cell list (JSON, one line) of ``specs`` writing ``outs``."""
    return json.dumps([{**spec.to_dict(), "out": str(out)} for spec, out in zip(specs, outs)],
                      separators=(",", ":"))


# ----------------------------------------------------------------------------------------------- #
# Grouping


def seeds_key(spec: RunSpec) -> tuple:
    """Everything but the seed: cells with equal keys are the seeds of one cell."""
    return tuple((k, v) for k, v in spec.to_dict().items() if k != "seed")


def compatibility_key(spec: RunSpec) -> tuple:
    """What cells must share to run as one batched problem (:meth:`dpbr.spec.RunSpec.batch_key`, the
    batched engine's key; no torch, so the workflow plans its bundles while Snakemake parses it)."""
    return spec.batch_key()


def chunks(specs: Sequence[RunSpec], mode: Any) -> list[tuple[RunSpec, ...]]:
    """The workflow's static groups of cells: each group's cells may run in one job.

    ``mode`` is ``"none"`` (every cell alone), ``"seeds"`` (the seeds of each cell together) or
    ``{"cells": K}`` (up to K cells of one dataset and model: the process loads them once, runs the
    cells with equal :func:`compatibility_key` as one batched simulation and the batches one after
    the other; compatible cells, and the seeds of a cell, are adjacent). No group has more than
    :data:`MAX_BUNDLE` cells. The groups depend on the configured cells only, never on which files
    exist.
    """
    if mode == "none":
        return [(s,) for s in specs]
    if mode == "seeds":
        groups: dict[tuple, list[RunSpec]] = {}
        for s in specs:
            groups.setdefault(seeds_key(s), []).append(s)
        return [tuple(g[i:i + MAX_BUNDLE]) for g in groups.values() for i in range(0, len(g), MAX_BUNDLE)]
    size = min(int(mode["cells"]), MAX_BUNDLE)
    by_task: dict[tuple, dict[tuple, dict[tuple, list[RunSpec]]]] = {}
    for s in specs:
        (by_task.setdefault((s.dataset, s.model), {}).setdefault(compatibility_key(s), {})
         .setdefault(seeds_key(s), []).append(s))
    out: list[tuple[RunSpec, ...]] = []
    for batches in by_task.values():
        ordered = [s for cells in batches.values() for seeds in cells.values() for s in seeds]
        out += [tuple(ordered[i:i + size]) for i in range(0, len(ordered), size)]
    return out


@dataclass(frozen=True)
class Bundle:
    """Cells of one static group that one workflow job runs together.

    ``members`` is the whole group (in order) and ``mask`` the bits of the members this job runs, so
    the job's rule name, ``train_bundle_<group id>_<mask in hex>``, identifies its cells without
    looking at which files exist (a cluster job parses the workflow again, when other jobs may have
    written or removed files).
    """

    members: tuple[RunSpec, ...]
    mask: int

    @property
    def group_id(self) -> str:
        """12 hex digits of the SHA-256 of the group's cell ids."""
        return hashlib.sha256("\n".join(s.cell_id() for s in self.members).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """The job's rule name (also the stem of its log file)."""
        return f"train_bundle_{self.group_id}_{self.mask:x}"

    @property
    def specs(self) -> tuple[RunSpec, ...]:
        """The cells this job runs, in group order."""
        return tuple(s for i, s in enumerate(self.members) if self.mask >> i & 1)


_BUNDLE_NAME = re.compile(r"^train_bundle_([0-9a-f]{12})_([0-9a-f]+)$")


def plan(groups: Sequence[tuple[RunSpec, ...]], missing: Callable[[RunSpec], bool],
         targets: Iterable[str] = ()) -> tuple[list[RunSpec], list[Bundle]]:
    """Split the groups into cells run alone and bundles.

    The missing cells of a group form one bundle when there are at least two; a cell whose file
    exists (Snakemake's own rerun triggers then decide about it) or that is its group's only missing
    cell runs alone. ``targets`` are rule names a cluster job was asked to run: each bundle named
    there is rebuilt from its name (and the groups) whatever files exist now.

    Returns
    -------
    (alone, bundles)
        The cells run alone (in order) and the bundles.
    """
    alone: list[RunSpec] = []
    bundles: list[Bundle] = []
    for group in groups:
        mask = sum(1 << i for i, s in enumerate(group) if missing(s))
        if bin(mask).count("1") >= 2:
            bundles.append(Bundle(group, mask))
            alone += [s for i, s in enumerate(group) if not mask >> i & 1]
        else:
            alone += list(group)
    wanted = {m.group(1): int(m.group(2), 16) for m in map(_BUNDLE_NAME.match, targets) if m}
    if wanted:
        have = {b.name for b in bundles}
        for group in groups:
            b = Bundle(group, 0)
            if b.group_id in wanted:
                b = Bundle(group, wanted[b.group_id] & ((1 << len(group)) - 1))
                if b.name not in have:
                    bundles.append(b)
    return alone, bundles
