"""Experiment grids: a configuration section → the cells it names.

A section of the workflow configuration (``train:``; later ``vn:``, ``reconstruct:``) has the form::

    train:
      defaults:                 # any field of the section's spec (RunSpec for train)
        dataset: mnist
        steps: 300
      grid:                     # a LIST of sub-grids; the cells are the union of their products
        - pair:                 # a "bundle": a list of mappings, each setting several fields at once
            - {gar: average, attack: none}
            - {gar: mda, attack: "little(factor=1.5,negative=true)"}
          privacy: [{epsilon: none}, {epsilon: 0.2}, {sparsify: 0.25}]
          batch_size: [10, 50]  # a field: a list of values (or one value)
        - {gar: [krum], attack: [empire], batch_size: [50]}

Each sub-grid is the cartesian product of its dimensions, merged over ``defaults``: a dimension
named like a spec field lists values of that field; any other name is a *bundle* whose values are
mappings of several fields (so impossible combinations such as ``average`` with an attack are never
generated). Every cell is built with the spec's ``create`` (validation and canonical form), and
cells with the same id collapse to one.

Errors name the configuration key (``train.grid[0].batch_size[1]``), the value and what is allowed,
in one line (:class:`dpbr.errors.UsageError`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Mapping, Sequence

from dpbr.errors import UsageError
from dpbr.spec import CellSpec

__all__ = ["describe", "did_you_mean", "expand", "schema_error_message", "spec_fields"]


def spec_fields(spec_cls: type[CellSpec]) -> list[str]:
    """The field names of a spec class, in declaration order (the keys a section may set)."""
    return [f.name for f in dataclasses.fields(spec_cls)]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(values: Mapping[str, Any], limit: int = 200) -> str:
    """``{a: 1, b: 'x'}`` → ``"a=1, b='x'"`` (shortened to ``limit`` characters), for messages."""
    return _shorten(", ".join(f"{k}={v!r}" for k, v in values.items()), limit)


def did_you_mean(key: str, names: Iterable[str]) -> str | None:
    """The name in ``names`` closest to ``key`` when it is close enough to be a typo of it
    (``batch_sizes`` → ``batch_size``), else None (:func:`difflib.get_close_matches`, cutoff 0.8)."""
    import difflib

    if not isinstance(key, str):
        return None
    match = difflib.get_close_matches(key, list(names), n=1, cutoff=0.8)
    return match[0] if match else None


def _hint(key: Any, names: Iterable[str]) -> str:
    """``"; did you mean 'batch_size'?"`` when ``key`` looks like a typo of one of ``names``, else ``""``."""
    near = did_you_mean(key, names)
    return f"; did you mean {near!r}?" if near else ""


def _as_list(values: Any) -> tuple[list[Any], bool]:
    """``(values as a list, whether the configuration gave a list)``."""
    if isinstance(values, (list, tuple)):
        return list(values), True
    return [values], False


def _dimension(section: str, index: int, key: str, values: Any, fields: Sequence[str]) -> list[dict[str, tuple[Any, str]]]:
    """The options of one sub-grid dimension: each a mapping ``field → (value, config key)``."""
    where = f"{section}.grid[{index}].{key}"
    items, listed = _as_list(values)
    if not items:
        raise UsageError(where, "lists no value; give at least one value (or remove the key)")

    def at(j: int) -> str:
        return f"{where}[{j}]" if listed else where

    if key in fields:
        for j, v in enumerate(items):
            if isinstance(v, (Mapping, list, tuple)):
                raise UsageError(at(j), f"{v!r} is not a single value; {key} takes one value per grid entry")
        return [{key: (v, at(j))} for j, v in enumerate(items)]
    options: list[dict[str, tuple[Any, str]]] = []
    near = did_you_mean(key, fields)
    if near and not all(isinstance(b, Mapping) for b in items):  # a misspelt parameter, not a bundle
        raise UsageError(where, f"unknown key {key!r}; did you mean {near!r}? (a key that is not a parameter "
                                "is a bundle: a list of mappings parameter → value)")
    for j, bundle in enumerate(items):
        if not isinstance(bundle, Mapping):
            raise UsageError(
                at(j),
                f"{key!r} is not a parameter, so it must be a bundle (a list of mappings parameter → value), "
                f"got {bundle!r}; parameters: {', '.join(fields)}",
            )
        if not bundle:
            raise UsageError(at(j), "is an empty mapping; a bundle entry sets at least one parameter")
        for k in bundle:
            if k not in fields:
                raise UsageError(f"{at(j)}.{k}", f"unknown parameter; allowed: {', '.join(fields)}{_hint(k, fields)}")
        options.append({k: (v, f"{at(j)}.{k}") for k, v in bundle.items()})
    return options


def _create(spec_cls: type[CellSpec], assigned: Mapping[str, tuple[Any, str]], context: str) -> CellSpec:
    """``spec_cls.create`` on the assigned values; a rejection names the config key that set the value."""
    values = {k: v for k, (v, _) in assigned.items()}
    try:
        return spec_cls.create(**values)
    except UsageError as exc:
        field = exc.option.lstrip("-").replace("-", "_")
        if field in assigned:
            value, where = assigned[field]
            raise UsageError(where, f"{value!r} is not allowed: {exc.message}") from None
        raise UsageError(context, f"{exc.one_line()} (in the cell {describe(values)})") from None


def expand(config: Mapping[str, Any] | None, spec_cls: type[CellSpec], section: str) -> dict[str, CellSpec]:
    """The cells of one configuration section, ``{cell id: spec}`` in configuration order.

    Parameters
    ----------
    config:
        The section: ``{"defaults": {field: value}, "grid": [sub-grid, ...]}`` (both optional; no
        grid → no cells). A sub-grid maps a field to a list of values (or one value), or any other
        name to a bundle (a list of mappings field → value). The cells of a sub-grid are the
        cartesian product of its dimensions, each merged over ``defaults`` (later wins).
    spec_cls:
        The section's spec class (:class:`dpbr.spec.RunSpec` for ``train``); its ``create`` validates
        and canonicalises each cell.
    section:
        The section's name, used in error messages (``train.grid[0].batch_size[1]``).

    Returns
    -------
    dict
        ``{spec.cell_id(): spec}``; cells named twice (by two sub-grids, or by spellings that
        canonicalise alike such as ``1`` and ``1.0``) appear once, at their first position.

    Raises
    ------
    UsageError
        One line naming the configuration key, the value and what is allowed.
    """
    config = config or {}
    fields = spec_fields(spec_cls)
    defaults = config.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise UsageError(f"{section}.defaults", f"must be a mapping parameter → value, got {defaults!r}")
    for k, v in defaults.items():
        if k not in fields:
            raise UsageError(f"{section}.defaults.{k}", f"unknown parameter; allowed: {', '.join(fields)}{_hint(k, fields)}")
    base = {k: (v, f"{section}.defaults.{k}") for k, v in defaults.items()}
    grid = config.get("grid")
    if grid is None:
        return {}
    if not isinstance(grid, (list, tuple)):
        raise UsageError(f"{section}.grid", "must be a list of sub-grids (mappings dimension → values)")
    cells: dict[str, CellSpec] = {}
    for i, sub in enumerate(grid):
        context = f"{section}.grid[{i}]"
        if not isinstance(sub, Mapping):
            raise UsageError(context, f"must be a mapping dimension → list of values, got {sub!r}")
        dims = [_dimension(section, i, key, values, fields) for key, values in sub.items()]
        owner: dict[str, str] = {}
        for key, options in zip(sub, dims):
            for field in sorted(set().union(*options)):
                if field in owner:
                    raise UsageError(context, f"{field!r} is set by both {owner[field]!r} and {key!r}")
                owner[field] = key
        for combo in itertools.product(*dims):
            assigned = dict(base)
            for part in combo:
                assigned.update(part)
            spec = _create(spec_cls, assigned, context)
            cells.setdefault(spec.cell_id(), spec)
    _check_system_levels(cells, section)
    return cells


def _check_system_levels(cells: Mapping[str, CellSpec], section: str) -> None:
    """Refuse a train section whose cells mix the default system (one trusted server, default ideal
    network, no staleness: no system level in the cell id) with others (a system level): the workflow
    names a section's files by one pattern, which has the level or not."""
    from dpbr.spec import RunSpec, default_system

    specs = [c for c in cells.values() if isinstance(c, RunSpec)]
    plain = [default_system(c) for c in specs]
    if any(plain) and not all(plain):
        raise UsageError(f"{section}.grid", "cells of the default system (system server, network ideal, staleness 0) "
                         "and of other systems cannot share a section; give the one-server baselines an explicit "
                         "link, e.g. network: 'ideal(compute=0.01)', or run them from another config")


# ----------------------------------------------------------------------------------------------- #
# JSON-schema errors → one line


def _key_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _misspelt_grid_key(path: list[Any], validator: Any) -> str | None:
    """The message for a sub-grid key that is not a parameter and holds plain values instead of a
    bundle's mappings, when it looks like a typo of a parameter: the schema sees a bundle of the wrong
    type (``train.grid[0].batch_sizes[0]: 10 is not of type 'object'``), the user meant ``batch_size``."""
    from dpbr.spec import ReconSpec, RunSpec, VNSpec

    specs = {"train": RunSpec, "vn": VNSpec, "reconstruct": ReconSpec}
    if (validator != "type" or len(path) not in (4, 5) or path[0] not in specs or path[1] != "grid"
            or not isinstance(path[2], int) or not isinstance(path[3], str)):
        return None
    key, fields = path[3], spec_fields(specs[path[0]])
    near = did_you_mean(key, fields) if key not in fields else None
    if near is None:
        return None
    return (f"{path[0]}.grid[{path[2]}].{key}: unknown key {key!r}; did you mean {near!r}? (a key that is not a "
            "parameter is a bundle: a list of mappings parameter → value)")


def schema_error_message(error: Any) -> str:
    """One line for a :class:`jsonschema.ValidationError`: the key, the value and what is allowed.

    ``train.defaults.batch_size: 'ten' is not allowed: 'ten' is not of type 'integer' (allowed: an
    integer)``; unknown keys list the allowed ones.
    """
    where = _key_path(error.absolute_path)
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra and allowed and schema.get("additionalProperties") is False:
            key = f"{where}.{extra[0]}" if where != "(top level)" else extra[0]
            return f"{key}: unknown key; allowed: {', '.join(allowed)}{_hint(extra[0], allowed)}"
    typo = _misspelt_grid_key(list(error.absolute_path), error.validator)
    if typo is not None:
        return typo
    allowed_text = schema.get("description")
    value = error.instance
    shown = _shorten(repr(value), 120)
    msg = f"{where}: {shown} is not allowed: {' '.join(str(error.message).split())}"
    if allowed_text:
        msg += f" (allowed: {allowed_text})"
    return msg
