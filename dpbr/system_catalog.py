"""The system a run simulates, its network and its staleness: parsed, validated, canonical (no torch; the
Snakefile plans cells with it, as with :mod:`dpbr.model_catalog`).

``dpbr train --system``, ``--network`` and ``--staleness`` choose how the simulated parameter server is
built; the default (``server``, ``ideal``, 0) is the one trusted, synchronous server of the rest of dpbr.

Systems (``--system``):

* ``server`` — one trusted parameter server aggregating the ``n`` workers' gradients with ``--gar``.
* ``draco(r=3, code=repetition|cyclic, vote=exact|tolerance, tol=0)`` — Chen, Wang, Charles &
  Papailiopoulos 2018, "DRACO: Byzantine-resilient distributed training via redundant gradients",
  arXiv 1803.09877: every gradient task is computed by ``r`` workers and the server decodes (a
  majority vote per group of the fractional repetition code; error location and decoding for the
  cyclic code). Exact recovery of the adversary-free gradient needs ``r ≥ 2f + 1`` (``f`` =
  ``--byzantine``); the decoder replaces the aggregation rule (``--gar average``).
* ``guanyu(m=6, byzantine=1, attack=random, q=…, qbar=…)`` — El Mhamdi, Guerraoui, Guirguis &
  Rouault 2019, "SGD: Decentralized Byzantine resilience", arXiv 1905.03853: ``m`` replicated servers
  of which ``byzantine`` lie; every worker takes the coordinate-wise median of a quorum of ``qbar``
  server models, every server aggregates a quorum of ``q`` gradients with ``--gar`` and the servers
  median a quorum of ``qbar`` of each other's models. Requirements: ``2f + 3 ≤ q ≤ n − f`` and
  ``2·byzantine + 3 ≤ qbar ≤ m − byzantine`` (so ``m ≥ 3·byzantine + 3``).
* ``liubei(m=4, byzantine=1, attack=random, gather=10)`` — El Mhamdi, Guerraoui & Guirguis 2020,
  "Fast machine learning with Byzantine workers and servers", PODC 2020 (brief announcement): every
  worker pulls *one* server's model and keeps it only if it passes a Lipschitz filter and a
  model-distance filter (otherwise it asks the next server); the servers median their models every
  ``gather`` steps. Requirement: ``m ≥ 3·byzantine + 1``.

Server attacks (``attack=`` of ``guanyu``/``liubei``): ``random`` (a Gaussian model of the honest
models' scale), ``negate`` (−the honest mean model), ``equivocate`` (a different random model to every
recipient), ``silent`` (no reply: the quorum waits for honest servers).

Networks (``--network``): ``ideal(latency=1e-4, bandwidth=1.25e9, compute=0)`` and
``lossy(drop=0.01, fill=nans|zeros|lost, latency=…, bandwidth=…, compute=…)`` — the worker→server
gradient messages travel as UDP packets each lost with probability ``drop`` (Damaskinos, El Mhamdi,
Guerraoui, Guirguis & Rouault 2019, "AggregaThor: Byzantine machine learning via robust gradient
aggregation", SysML 2019): a lost packet's coordinates arrive as NaN or 0, or (``lost``) the whole
message is missing. ``latency`` (s per round), ``bandwidth`` (bytes/s per node) and ``compute``
(s per mini-batch gradient) drive the simulated step time of :mod:`dpbr.simulation.systems.costs`.

Staleness (``--staleness τ``): every honest worker's gradient is computed on the model of ``τ_i``
steps ago, ``τ_i`` drawn uniformly from ``0..τ`` per worker and step (bounded-staleness SGD; the
server does not wait for the slowest worker). With ``server`` and ``guanyu`` (whose quorums take
the gradients as they come).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from dpbr.errors import UsageError
from dpbr.registry import format_term, parse

__all__ = ["SYSTEMS", "NETWORKS", "SERVER_ATTACKS", "SystemSpec", "NetworkSpec", "parse_system", "parse_network",
           "check_system", "DEFAULT_SYSTEM", "DEFAULT_NETWORK"]

DEFAULT_SYSTEM = "server"
DEFAULT_NETWORK = "ideal"
SERVER_ATTACKS: tuple[str, ...] = ("random", "negate", "equivocate", "silent")
FILLS: tuple[str, ...] = ("nans", "zeros", "lost")

#: each system's parameters and defaults (``None``: derived from n, f or m when the run is checked)
SYSTEMS: dict[str, dict[str, Any]] = {
    "server": {},
    "draco": {"r": 3, "code": "repetition", "vote": "exact", "tol": 0.0},
    "guanyu": {"m": 6, "byzantine": 1, "attack": "random", "q": None, "qbar": None},
    "liubei": {"m": 4, "byzantine": 1, "attack": "random", "gather": 10},
}
_LINK = {"latency": 1e-4, "bandwidth": 1.25e9, "compute": 0.0}
NETWORKS: dict[str, dict[str, Any]] = {
    "ideal": dict(_LINK),
    "lossy": {"drop": 0.01, "fill": "nans", **_LINK},
}


@dataclass(frozen=True)
class SystemSpec:
    """A parsed ``--system``: its name and every parameter (defaults filled in, ``None`` where derived)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """Canonical spec text: the name alone for ``server``, else every parameter that is not ``None``."""
        shown = {k: v for k, v in self.params.items() if v is not None}
        return format_term(self.name, shown) if shown else self.name

    def __getitem__(self, key: str) -> Any:
        return self.params[key]


@dataclass(frozen=True)
class NetworkSpec:
    """A parsed ``--network``: packet loss (``drop``, ``fill``) and the link model of the costs."""

    name: str
    drop: float
    fill: str
    latency: float
    bandwidth: float
    compute: float

    def text(self) -> str:
        """Canonical spec text: the parameters that differ from their defaults (``drop`` always shown
        for ``lossy``), so that ``ideal`` and ``ideal(latency=1e-4)`` name the same cell."""
        defaults = NETWORKS[self.name]
        params = {k: getattr(self, k) for k in defaults if getattr(self, k) != defaults[k] or k == "drop"}
        return format_term(self.name, params) if params else self.name

    @property
    def fill_mode(self) -> str:
        """What a lost packet leaves, in :func:`dpbr.simulation.systems.network.transmit`'s words."""
        return {"nans": "nan", "zeros": "zero", "lost": "lost"}[self.fill]

    @property
    def lossy(self) -> bool:
        """Whether any packet can be lost."""
        return self.drop > 0


def _one_term(text: Any, option: str, catalogue: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    terms = parse(str(text), option=option)
    if len(terms) != 1:
        raise UsageError(option, f"one term expected, not {len(terms)}; allowed: {', '.join(catalogue)}")
    name, given = terms[0]
    if name not in catalogue:
        raise UsageError(option, f"unknown {name!r}; allowed: {', '.join(catalogue)}")
    unknown = sorted(set(given) - set(catalogue[name]))
    if unknown:
        allowed = ", ".join(catalogue[name]) or "none"
        raise UsageError(option, f"{name} has no parameter {unknown[0]!r}; allowed: {allowed}")
    return name, {**catalogue[name], **given}


def _int_param(params: dict[str, Any], key: str, option: str, name: str, *, low: int) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(option, f"{name}({key}=…) must be an integer >= {low}, not {value!r}")
    return value


def _float_param(params: dict[str, Any], key: str, option: str, name: str, *, low: float, low_open: bool = False,
                 high: float | None = None) -> float:
    value = params[key]
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (high is None or value <= high))
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        if high is not None:
            bound += f" and <= {high}"
        raise UsageError(option, f"{name}({key}=…) must be a finite number {bound}, not {value!r}")
    return float(value)


def _word_param(params: dict[str, Any], key: str, option: str, name: str, allowed: tuple[str, ...]) -> str:
    value = str(params[key]).lower()
    if value not in allowed:
        raise UsageError(option, f"{name}({key}=…) must be one of {', '.join(allowed)}, not {params[key]!r}")
    return value


def parse_system(text: Any = DEFAULT_SYSTEM) -> SystemSpec:
    """Parse and type-check ``--system`` (the requirements on ``n`` and ``f``: :func:`check_system`)."""
    option = "--system"
    name, p = _one_term(text, option, SYSTEMS)
    if name == "draco":
        p["r"] = _int_param(p, "r", option, name, low=1)
        p["code"] = _word_param(p, "code", option, name, ("repetition", "cyclic"))
        p["vote"] = _word_param(p, "vote", option, name, ("exact", "tolerance"))
        p["tol"] = _float_param(p, "tol", option, name, low=0.0)
        if p["vote"] == "tolerance" and p["tol"] == 0:
            raise UsageError(option, "draco(vote=tolerance) needs tol > 0 (the largest distance between agreeing replicas)")
        if p["vote"] == "exact" and p["tol"] != 0 and p["code"] == "repetition":
            raise UsageError(option, "draco(tol=…) needs vote=tolerance with the repetition code")
    elif name in ("guanyu", "liubei"):
        p["m"] = _int_param(p, "m", option, name, low=1)
        p["byzantine"] = _int_param(p, "byzantine", option, name, low=0)
        p["attack"] = _word_param(p, "attack", option, name, SERVER_ATTACKS)
        if name == "guanyu":
            for key in ("q", "qbar"):
                if p[key] is not None:
                    p[key] = _int_param(p, key, option, name, low=1)
        else:
            p["gather"] = _int_param(p, "gather", option, name, low=1)
    return SystemSpec(name, p)


def parse_network(text: Any = DEFAULT_NETWORK) -> NetworkSpec:
    """Parse and validate ``--network``."""
    option = "--network"
    name, p = _one_term(text, option, NETWORKS)
    drop = _float_param(p, "drop", option, name, low=0.0, high=1.0) if name == "lossy" else 0.0
    fill = _word_param(p, "fill", option, name, FILLS) if name == "lossy" else "nans"
    if name == "lossy" and drop >= 1.0:
        raise UsageError(option, "lossy(drop=…) must be < 1 (every message would be lost)")
    return NetworkSpec(
        name=name, drop=drop, fill=fill,
        latency=_float_param(p, "latency", option, name, low=0.0),
        bandwidth=_float_param(p, "bandwidth", option, name, low=0.0, low_open=True),
        compute=_float_param(p, "compute", option, name, low=0.0),
    )


def check_system(system: SystemSpec, *, workers: int, byzantine: int, byzantine_real: int, gar: str,
                 staleness: int, worker_momentum: float) -> SystemSpec:
    """The system with its derived parameters filled in, after checking its requirements on the run.

    Raises :class:`~dpbr.errors.UsageError` naming ``--system`` (or ``--staleness``) and what is
    allowed: DRACO's ``r ≥ 2f + 1`` (and ``r`` dividing ``n`` for the repetition code, ``r ≤ n`` for the
    cyclic one), GuanYu's quorums ``2f + 3 ≤ q ≤ n`` and ``2f̄ + 3 ≤ q̄ ≤ m − f̄``, LiuBei's
    ``m ≥ 3f̄ + 1``.
    """
    option = "--system"
    name, p = system.name, dict(system.params)
    if staleness and name not in ("server", "guanyu"):
        raise UsageError("--staleness", f"staleness is simulated with --system server or guanyu, not {name}")
    if name == "draco":
        r, code = p["r"], p["code"]
        if r < 2 * byzantine + 1:
            raise UsageError(option, f"draco needs r >= 2f + 1 = {2 * byzantine + 1} for f = {byzantine} "
                                     f"(--byzantine); r = {r} recovers from at most {(r - 1) // 2}")
        if code == "repetition" and workers % r:
            raise UsageError(option, f"draco(code=repetition) needs r to divide n = {workers}; r = {r} does not")
        if code == "cyclic" and r > workers:
            raise UsageError(option, f"draco(code=cyclic) needs r <= n = {workers}, not {r}")
        if gar != "average":
            raise UsageError("--gar", f"draco decodes by vote instead of a rule; use --gar average, not {gar}")
        if worker_momentum:
            raise UsageError("--worker-momentum", "must be 0 with --system draco (the replicas would carry different momenta)")
        if code == "cyclic" and p["vote"] == "tolerance":
            raise UsageError(option, "draco(code=cyclic) locates adversaries by a residual test: set tol=… with vote=exact")
    elif name in ("guanyu", "liubei"):
        m, fbar = p["m"], p["byzantine"]
        if name == "guanyu":
            if m < 3 * fbar + 3:
                raise UsageError(option, f"guanyu needs m >= 3·byzantine + 3 = {3 * fbar + 3} servers "
                                         f"(quorum 2f̄ + 3 <= q̄ <= m − f̄), not m = {m}")
            q = p["q"] if p["q"] is not None else workers - byzantine
            qbar = p["qbar"] if p["qbar"] is not None else m - fbar
            if p["q"] is None and q < 2 * byzantine + 3:
                raise UsageError(option, f"guanyu's default worker quorum q = n − f = {q} is below 2f + 3 = "
                                         f"{2 * byzantine + 3}: it needs n >= 3f + 3 = {3 * byzantine + 3} workers "
                                         f"(--workers) or a smaller --byzantine")
            if not 2 * byzantine + 3 <= q <= workers:
                raise UsageError(option, f"guanyu(q=…) must be in {2 * byzantine + 3} .. {workers} "
                                         f"(2f + 3 <= q <= n with n = {workers}, f = {byzantine}), not {q}")
            if not 2 * fbar + 3 <= qbar <= m - fbar:
                raise UsageError(option, f"guanyu(qbar=…) must be in {2 * fbar + 3} .. {m - fbar} "
                                         f"(2f̄ + 3 <= q̄ <= m − f̄), not {qbar}")
            p["q"], p["qbar"] = q, qbar
        elif m < 3 * fbar + 1:
            raise UsageError(option, f"liubei needs m >= 3·byzantine + 1 = {3 * fbar + 1} servers, not m = {m}")
        if worker_momentum:
            raise UsageError("--worker-momentum", f"must be 0 with --system {name}")
    return SystemSpec(name, p)
