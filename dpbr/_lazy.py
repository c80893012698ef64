"""Deferred imports of heavy modules (torch, scipy) for modules that must stay light to import.

The workflow's Snakefile validates every cell of a grid with the specs' ``create`` (names of rules,
attacks, privacy mechanisms, datasets, models) before any job starts. That needs the registries in
:mod:`dpbr.robust.aggregators`, :mod:`dpbr.robust.attacks`, :mod:`dpbr.privacy.mechanisms` and
:mod:`dpbr.data`, but none of their tensor code. Importing torch costs 2–4 s on the 2-core machine
of this project (the CUDA build), more than Snakemake's own start-up, so these modules bind ``torch``
to a :class:`LazyModule` instead and the import happens on the first use of a tensor function.

Usage, at the top of a module::

    from typing import TYPE_CHECKING
    from dpbr._lazy import LazyModule

    if TYPE_CHECKING:  # type checkers see the real module
        import torch
    else:
        torch = LazyModule("torch", globals())
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, MutableMapping

__all__ = ["LazyModule"]


class LazyModule:
    """Stand-in for the module ``name``, bound to ``alias`` in the namespace ``namespace``.

    The first attribute access imports the module and rebinds ``namespace[alias]`` to the real
    module, so later lookups of the name in that module cost nothing extra (no proxy in hot
    loops). Accesses through this object itself keep working afterwards (they forward to the module).
    """

    __slots__ = ("_name", "_namespace", "_alias")

    def __init__(self, name: str, namespace: MutableMapping[str, Any], alias: str | None = None) -> None:
        self._name = name
        self._namespace = namespace
        self._alias = alias or name.rsplit(".", 1)[-1]

    def load(self) -> ModuleType:
        """Import the module (once; Python caches it), bind it in the namespace and return it."""
        module = importlib.import_module(self._name)
        if self._namespace.get(self._alias) is self:
            self._namespace[self._alias] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
