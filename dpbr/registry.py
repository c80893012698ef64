"""Named, parameterised components: ``"multi-krum(m=4)"``, ``"bucketing(s=2)+krum"``.

Aggregation rules, attacks and privacy mechanisms are looked up by a *spec string*: a name, optionally
followed by keyword parameters in parentheses, and for composable kinds several such terms joined
by ``+``. This module parses and prints those strings canonically (so that equal specs give equal cell
ids) and holds the registry class every component family uses, one way: a class decorator on the
component itself declares its name and aliases, the class's ``__init__`` signature declares its
parameters, and the family's base class declares what else each member states beside its kernel
(an aggregation rule's requirement on ``n, f`` and its VN bound)::

    rules: Registry[Aggregator] = Registry(kind="aggregation rule", option="--gar")

    @rules.register("median", "cm")       # name, then aliases; sets Median.key = "median"
    class Median(Aggregator):
        def _clauses(self): ...            # requirement n >= 2f + 1
        def _vn(self, n, f): ...           # VN bound 1/sqrt(n - f)
        def _aggregate(self, G, f, generator, state): ...

Grammar::

    spec   := term ("+" term)*
    term   := name [ "(" [ key "=" value ("," key "=" value)* ] ")" ]
    value  := int | float | true | false | none | bare-word

Examples: ``parse("bucketing(s=2)+krum") == [("bucketing", {"s": 2}), ("krum", {})]``.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from dpbr.validate import param_value

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_TERM = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_\-]*)\s*(?:\((.*)\))?\s*$", re.S)
_INT = re.compile(r"^[+-]?\d+$")


def format_float(x: float) -> str:
    """Canonical, round-trip-exact text of a number: ``1.0 -> "1"``, ``0.2 -> "0.2"``, ``1e-06 -> "1e-06"``.

    Integral values print without a decimal point, everything else with Python's shortest
    round-trip ``repr``, a positive exponent without its ``+`` (``1e+20 -> "1e20"``: a ``+`` would
    split a spec string such as ``clip(c=1e20)+gaussian(...)``); ``inf``/``nan`` print as
    ``inf``/``nan``. Used for every float in a cell id, so that YAML's ``1``, ``1.0`` and ``1.0e0``
    name the same cell.
    """
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 1e16:
        return str(int(x))
    return repr(x).replace("e+", "e")


def parse_value(text: str) -> Any:
    """Parse one parameter value: int, float, bool, ``none`` or a bare word (returned as ``str``)."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.match(t):
        return int(t)
    try:
        return float(t)
    except ValueError:
        return t


def format_value(v: Any) -> str:
    """Canonical text of a parameter value (inverse of :func:`parse_value`)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_float(v)
    return str(v)


def parse(spec: str, *, option: str = "spec") -> list[tuple[str, dict[str, Any]]]:
    """Split a spec string into ``[(name, params), ...]`` terms (fresh lists and dicts each call).

    The parse of each text is memoised (:func:`_parse_terms`; a grid validates the same few
    strings thousands of times).

    Raises
    ------
    dpbr.errors.UsageError
        When the text does not follow the grammar above (the message names ``option``).
    """
    from dpbr.errors import UsageError

    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(option, "empty; expected a name such as 'krum' or 'multi-krum(m=4)'")
    return [(name, dict(params)) for name, params in _parse_terms(spec, option)]


@functools.lru_cache(maxsize=4096)
def _parse_terms(spec: str, option: str) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """The terms of a non-empty spec string, as immutable tuples (see :func:`parse`)."""
    from dpbr.errors import UsageError

    terms: list[tuple[str, dict[str, Any]]] = []
    for raw in _split_top_level(spec, "+"):
        m = _TERM.match(raw)
        if not m:
            raise UsageError(option, f"cannot parse {raw.strip()!r}; expected name or name(key=value, ...)")
        name, args = m.group(1).lower(), m.group(2)
        if args is not None and ("(" in args or ")" in args):
            raise UsageError(option, f"cannot parse {raw.strip()!r}; parameters are key=value without parentheses")
        params: dict[str, Any] = {}
        if args is not None and args.strip():
            for part in _split_top_level(args, ","):
                if "=" not in part:
                    raise UsageError(option, f"parameter {part.strip()!r} of {name!r} must be key=value")
                key, value = part.split("=", 1)
                key = key.strip().replace("-", "_")
                if not key.isidentifier():
                    raise UsageError(option, f"bad parameter name {key!r} in {name!r}")
                if key in params:
                    raise UsageError(option, f"parameter {key!r} of {name!r} given twice")
                params[key] = param_value(parse_value(value), key, name, option)
        terms.append((name, params))
    return tuple((name, tuple(params.items())) for name, params in terms)


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def format_term(name: str, params: Mapping[str, Any]) -> str:
    """Canonical text of one term: parameters sorted by key, ``name`` alone when there are none."""
    if not params:
        return name
    inner = ",".join(f"{k}={format_value(params[k])}" for k in sorted(params))
    return f"{name}({inner})"


def canonical(spec: str, *, option: str = "spec") -> str:
    """Canonical text of a spec string (lower-case names, sorted parameters, canonical numbers)."""
    return "+".join(format_term(n, p) for n, p in parse(spec, option=option))


@dataclass
class Registry(Generic[T]):
    """A name → factory table for one family of components (rules, pre-aggregators, attacks, mechanisms).

    ``factory(**params)`` builds the component — a class (the usual case: see the module docstring) or
    a function; unknown names and unknown parameters become a :class:`dpbr.errors.UsageError` naming
    ``option`` and listing what is allowed.
    """

    kind: str
    option: str
    _factories: dict[str, Callable[..., T]] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)

    def register(self, name: str, *aliases: str) -> Callable[[F], F]:
        """Decorator registering ``factory`` under ``name`` (and optional aliases, all lower case).

        The factory's keyword parameters (those of ``__init__`` for a class) are the parameters a spec
        string may give. A class is also given its registered name as the class attribute ``key`` and
        its aliases as ``aliases``, so that the name is written once, on the class.
        """

        def deco(factory: F) -> F:
            if name in self._factories or name in self._aliases:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            for a in aliases:
                if a in self._factories or a in self._aliases:
                    raise RuntimeError(f"{self.kind} alias {a!r} registered twice")
            self._factories[name] = factory
            for a in aliases:
                self._aliases[a] = name
            if isinstance(factory, type):
                factory.key = name  # type: ignore[attr-defined]
                factory.aliases = aliases  # type: ignore[attr-defined]
            return factory

        return deco

    def names(self) -> list[str]:
        """Registered names (aliases excluded), sorted."""
        return sorted(self._factories)

    def resolve(self, name: str) -> str:
        """The registered name for ``name`` or an alias of it."""
        from dpbr.errors import UsageError

        key = name.strip().lower()
        key = self._aliases.get(key, key)
        if key not in self._factories:
            raise UsageError(self.option, f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return key

    def factory(self, name: str) -> Callable[..., T]:
        """The class (or function) registered under ``name`` or an alias of it."""
        return self._factories[self.resolve(name)]

    def build(self, name: str, *inputs: Any, **params: Any) -> T:
        """Build the component ``name`` with ``params``; bad parameter names give a UsageError.

        ``inputs`` fill the factory's first parameters: what composition supplies, not the spec (the
        rule a pre-aggregator wraps). They are not parameters a spec may name.
        """
        import inspect

        from dpbr.errors import UsageError

        key = self.resolve(name)
        factory = self._factories[key]
        sig = _signature(factory)
        supplied = list(sig.parameters)[: len(inputs)]
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        allowed = [p for p in sig.parameters
                   if sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD and p not in supplied]
        unknown = [k for k in params if k not in allowed and not accepts_any]
        if unknown:
            raise UsageError(
                self.option,
                f"{self.kind} {key!r} has no parameter {unknown[0]!r}; allowed: {', '.join(allowed) or 'none'}",
            )
        try:
            return factory(*inputs, **params)
        except UsageError:
            raise
        except (TypeError, ValueError) as exc:
            raise UsageError(self.option, f"{self.kind} {key!r}: {exc}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name.lower(), name.lower()) in self._factories


@functools.lru_cache(maxsize=256)
def _signature(factory: Callable[..., Any]) -> Any:
    """``inspect.signature(factory)``, memoised (a factory's signature does not change)."""
    import inspect

    return inspect.signature(factory)
