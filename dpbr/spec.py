"""One experiment cell = one frozen spec = one output file.

The spec classes here are the single source of truth for what a cell is and where its output lives:
the command line builds a spec from its options, the Snakemake workflow builds the same spec from the
configuration grid, and both name the output with :meth:`CellSpec.cell_id` / :meth:`CellSpec.path`.

A cell id is a readable path of ``key=value`` parts, grouped into directories, e.g.::

    dataset=mnist,model=cnn/gar=mda,attack=little_factor=1.5_negative=true/
    epsilon=0.2,delta=1e-06,clip=0.01,clip_mode=batch,sparsify=none,quantize=none/
    batch_size=50,workers=11,byzantine=5,byzantine_real=5,steps=1000,lr=2,momentum=0.99,.../seed=1

Floats are printed canonically (:func:`dpbr.registry.format_float`: ``1.0 -> 1``, ``1e-06``), absent
values as ``none``, and component spec strings (``little(factor=1.5,negative=true)``) in a path-safe
form, so that every way of writing the same cell gives the same id.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

from dpbr import validate
from dpbr.errors import UsageError
from dpbr.privacy.spec import PrivacySpec
from dpbr.registry import canonical, format_float

__all__ = [
    "CellSpec",
    "ReconSpec",
    "RunSpec",
    "VNSpec",
    "option_name",
    "model_terms",
    "path_token",
    "replace",
    "run_token",
]

_SAFE = re.compile(r"[^A-Za-z0-9._=+\-]")


def option_name(field_name: str) -> str:
    """The command-line option of a spec field: ``batch_size -> --batch-size``."""
    return "--" + field_name.replace("_", "-")


def path_token(value: Any) -> str:
    """Path-safe canonical text of one value (used in cell ids).

    ``None -> "none"``, booleans ``true``/``false``, floats via :func:`format_float`, component spec
    strings with ``(`` and ``,`` turned into ``_`` and ``)`` dropped:
    ``"little(factor=1.5,negative=true)" -> "little_factor=1.5_negative=true"``.
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format_float(value)
    text = str(value).replace("(", "_").replace(",", "_").replace(")", "")
    return _SAFE.sub("-", text)


@dataclass(frozen=True)
class CellSpec:
    """Base of every cell spec: canonical id, path, JSON and column forms.

    Subclasses are frozen dataclasses that set ``kind`` (the output folder, e.g. ``"train"``) and
    ``layout`` (groups of field names; each group becomes one directory level of the cell id). Every
    field must appear in exactly one group.
    """

    kind: ClassVar[str] = "cell"
    layout: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def cell_id(self) -> str:
        """The canonical, readable id of this cell: ``key=value`` parts grouped into directories."""
        return "/".join(",".join(f"{k}={path_token(getattr(self, k))}" for k in group) for group in self.layout)

    def path(self, root: str | Path = "results", suffix: str = ".parquet") -> Path:
        """Output path ``<root>/<kind>/<cell_id><suffix>`` — the only way output paths are built."""
        return Path(root) / self.kind / f"{self.cell_id()}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` mapping (JSON-compatible)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of the spec, with its kind."""
        return json.dumps({"kind": self.kind, **self.to_dict()}, sort_keys=True)

    def columns(self) -> dict[str, Any]:
        """The cell's parameters as Parquet columns (every output row carries them), plus ``cell_id``."""
        return {**self.to_dict(), "cell_id": self.cell_id()}

    def cli_args(self) -> list[str]:
        """The command-line options that rebuild this spec (``["--batch-size", "50", ...]``).

        A boolean field is a flag pair: ``--normalize`` / ``--no-normalize``.
        """
        args: list[str] = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                args.append(option_name(f.name) if v else "--no-" + option_name(f.name)[2:])
            else:
                args += [option_name(f.name), _cli_text(v)]
        return args

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Rebuild (and re-validate) a spec from :meth:`to_dict` output or a config mapping."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(data) - names - {"kind"})
        if extra:
            raise UsageError(extra[0], f"unknown {cls.kind} parameter; allowed: {', '.join(sorted(names))}")
        return cls.create(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def create(cls, **options: Any):  # pragma: no cover - overridden
        """Validate and normalise ``options`` into a spec (subclasses implement)."""
        return cls(**options)

    def __post_init__(self) -> None:
        listed = [k for group in self.layout for k in group]
        names = [f.name for f in fields(self)]
        if sorted(listed) != sorted(names):
            raise TypeError(f"{type(self).__name__}.layout must list every field exactly once")


def _cli_text(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format_float(v)
    return str(v)


# ----------------------------------------------------------------------------------------------- #
# Validation helpers (each raises a one-line UsageError naming the option and what is allowed)


def _int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """The integer field ``name`` (:func:`dpbr.validate.integer`, naming its option)."""
    return validate.integer(value, option_name(name), low=low, high=high)


def _float(value: Any, name: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """The number field ``name`` (:func:`dpbr.validate.number`, naming its option)."""
    return validate.number(value, option_name(name), low=low, high=high, low_open=low_open, high_open=high_open)


def _choice(value: Any, name: str, allowed: list[str]) -> str:
    """The field ``name``, one of ``allowed`` (:func:`dpbr.validate.choice`, naming its option)."""
    return validate.choice(value, option_name(name), allowed)


def _option_reader(cls: type, options: Mapping[str, Any], *, none_is_default: bool = False):
    """``given(name, default)`` over ``options`` after refusing names that are not fields of ``cls``.

    With ``none_is_default`` a value of None counts as not given.
    """
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(option_name(unknown[0]), f"unknown option; allowed: {', '.join(sorted(names))}")
    present = {k: v for k, v in options.items() if not (none_is_default and v is None)}

    def given(name: str, default: Any) -> Any:
        return present.get(name, default)

    return given


def model_terms() -> list[str]:
    """Every model of the catalogue as a spec with its parameters' defaults (``"mnist-example(width=1)"``),
    for help texts."""
    from dpbr import model_catalog
    from dpbr.registry import format_term

    return [format_term(name, model_catalog.resolve(name)[1]) for name in model_catalog.names()]


def _model_name(text: Any, allowed: list[str] | tuple[str, ...], context: str = "") -> str:
    """Canonical model spec string, its base name checked against ``allowed``."""
    model = str(text).strip()
    if _base(model, "--model") not in allowed:
        raise UsageError("--model", f"unknown model {model!r}{context}; allowed: {', '.join(allowed)}")
    return canonical(model, option="--model")


# ----------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class RunSpec(CellSpec):
    """One ``dpbr train`` cell: the simulated parameter-server run of Guerraoui et al. 2021 (arXiv 2102.08166).

    Build it with :meth:`create`, which validates every value, resolves model defaults (learning rate,
    momentum, clipping norm) and canonicalises component names, so that equal cells compare equal.
    """

    kind: ClassVar[str] = "train"
    layout: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("dataset", "model"),
        ("gar", "attack"),
        ("epsilon", "delta", "clip", "clip_mode", "sparsify", "quantize"),
        ("batch_size", "workers", "byzantine", "byzantine_real", "steps", "lr", "momentum",
         "eval_every", "partition", "worker_momentum"),
        ("system", "network", "staleness"),
        ("seed",),
    )

    dataset: str = "mnist"
    model: str = "cnn"
    gar: str = "average"
    attack: str = "none"
    epsilon: float | None = None
    delta: float = 1e-6
    clip: float | None = 0.01
    clip_mode: str = "batch"
    sparsify: float | None = None
    quantize: str | None = None
    batch_size: int = 50
    workers: int = 11
    byzantine: int = 5
    byzantine_real: int = 0
    steps: int = 1000
    lr: float = 2.0
    momentum: float = 0.99
    eval_every: int = 50
    partition: str = "iid"
    worker_momentum: float = 0.0
    system: str = "server"
    network: str = "ideal"
    staleness: int = 0
    seed: int = 1

    #: Most steps of one run: every step's metrics are kept in memory (a float64 row per step).
    MAX_STEPS: ClassVar[int] = 100_000_000

    @classmethod
    def create(cls, **options: Any) -> "RunSpec":
        """Validate ``options`` (field names) and return the canonical spec.

        Defaults: ``lr``, ``momentum`` and ``clip`` come from the model's defaults when absent
        (:func:`dpbr.models.default_hparams`); ``byzantine_real`` defaults to ``byzantine`` and is 0
        with ``attack="none"`` (the study's baseline: all n workers honest).

        Raises
        ------
        UsageError
            For any unknown name or value out of range, naming the option and what is allowed.
        """
        from dpbr import data
        from dpbr import model_catalog as models
        from dpbr.robust import aggregators, attacks
        from dpbr import system_catalog as systems

        given = _option_reader(cls, options)
        dataset = data.canonical_name(str(given("dataset", cls.dataset)).strip())
        model = _model_name(given("model", cls.model), models.names())
        _check_model_dataset(model, dataset)
        hp = models.default_hparams(model)

        workers = _int(given("workers", cls.workers), "workers", low=1)
        byzantine = _int(given("byzantine", cls.byzantine), "byzantine", low=0, high=max(workers - 1, 0))

        attack = attacks.get(canonical(str(given("attack", cls.attack)), option="--attack")).name
        attack_none = attack == "none"
        real_default = 0 if attack_none else byzantine
        byzantine_real = _int(given("byzantine_real", real_default), "byzantine_real", low=0, high=workers - 1)
        if attack_none and byzantine_real:
            raise UsageError("--byzantine-real", "must be 0 with --attack none (every worker is honest)")
        if not attack_none and byzantine_real == 0:
            raise UsageError("--byzantine-real", f"must be >= 1 with --attack {attack} (use --attack none for no attack)")

        gar = canonical(str(given("gar", cls.gar)), option="--gar")
        rule = aggregators.get(gar)
        try:
            rule.check(workers, byzantine)
        except ValueError as exc:
            raise UsageError("--byzantine", str(exc)) from None

        batch_size = _int(given("batch_size", cls.batch_size), "batch_size", low=1)
        privacy = PrivacySpec.create(given, batch_size=batch_size, default_clip=hp.get("clip", cls.clip),
                                     default_delta=cls.delta, default_clip_mode=cls.clip_mode)

        steps = _int(given("steps", cls.steps), "steps", low=1, high=cls.MAX_STEPS)
        lr = _float(given("lr", hp.get("lr", cls.lr)), "lr", low=0.0, low_open=True)
        momentum = _float(given("momentum", hp.get("momentum", cls.momentum)), "momentum", low=0.0, high=1.0, high_open=True)
        eval_every = _int(given("eval_every", cls.eval_every), "eval_every", low=0)
        partition = canonical(str(given("partition", cls.partition)), option="--partition")
        if _base(partition, "--partition") not in PARTITIONS:
            raise UsageError("--partition", f"unknown partition {partition!r}; allowed: {', '.join(PARTITIONS)}")
        worker_momentum = _float(given("worker_momentum", cls.worker_momentum), "worker_momentum", low=0.0, high=1.0, high_open=True)
        seed = _int(given("seed", cls.seed), "seed", low=0)
        staleness = _int(given("staleness", cls.staleness), "staleness", low=0, high=1000)
        system = systems.check_system(systems.parse_system(given("system", cls.system)), workers=workers,
                                      byzantine=byzantine, byzantine_real=byzantine_real, gar=rule.name,
                                      staleness=staleness, worker_momentum=worker_momentum)
        network = systems.parse_network(given("network", cls.network))

        return cls(
            dataset=dataset, model=model, gar=rule.name, attack=attack, **privacy.columns(), batch_size=batch_size,
            workers=workers, byzantine=byzantine, byzantine_real=byzantine_real, steps=steps, lr=lr,
            momentum=momentum, eval_every=eval_every, partition=partition, worker_momentum=worker_momentum,
            system=system.text(), network=network.text(), staleness=staleness, seed=seed,
        )

    # -- derived views ------------------------------------------------------------------------- #

    @property
    def honest(self) -> int:
        """Number of honest workers ``n − f_real``."""
        return self.workers - self.byzantine_real

    @functools.cached_property
    def privacy(self) -> PrivacySpec:
        """The cell's privacy setting: mechanisms, spec text and label (:class:`~dpbr.privacy.spec.PrivacySpec`)."""
        return _privacy_of(self)

    #: Fields in which cells may differ and still run as one batched simulation
    #: (:class:`dpbr.simulation.SeedBatch`), besides the attack's numeric ``factor``.
    BATCH_SCALARS: ClassVar[tuple[str, ...]] = ("seed", "epsilon", "delta", "clip", "lr", "momentum", "worker_momentum")

    def batch_key(self) -> tuple[Any, ...]:
        """What cells must share to run as one batched simulation: every field but :attr:`BATCH_SCALARS`,
        the attack without a numeric ``factor``, and the structure the scalars imply (noise or none,
        clipping or none, worker momentum or none). Two cells with equal keys run as members of one
        :class:`~dpbr.simulation.SeedBatch`, each member's output equal to its run alone; the workflow
        forms its bundles with the same key. No torch (the Snakefile plans bundles with it).
        """
        from dpbr.robust import attacks

        atk = attacks.get(self.attack)
        factor = atk.params.get("factor")
        numeric = isinstance(factor, (int, float)) and not isinstance(factor, bool)
        attack = (atk.key, tuple(sorted((k, repr(v)) for k, v in atk.params.items() if k != "factor")),
                  "number" if numeric else repr(factor))
        shared = tuple((f.name, getattr(self, f.name)) for f in fields(self)
                       if f.name not in self.BATCH_SCALARS and f.name != "attack")
        return (*shared, ("attack", attack), ("noise", self.epsilon is not None), ("clipping", self.clip is not None),
                ("worker_momentum", self.worker_momentum > 0))

    def label(self) -> str:
        """A short human label for plots: ``mda/little``."""
        return f"{self.gar}/{self.attack}"

    #: The fields that choose the simulated system (:mod:`dpbr.simulation.systems`), and their defaults:
    #: the one trusted synchronous server on an ideal network.
    SYSTEM_FIELDS: ClassVar[tuple[str, ...]] = ("system", "network", "staleness")

    @property
    def plain_server(self) -> bool:
        """Whether the cell simulates the one trusted synchronous server on an ideal link (the default)."""
        return self.system == "server" and self.network.startswith("ideal") and self.staleness == 0

    def cell_id(self) -> str:
        """As :meth:`CellSpec.cell_id`, without the system level when it holds the defaults (``server``,
        ``ideal``, 0), so that the cells of the one-server study keep their ids."""
        groups = [g for g in self.layout if not (g == RunSpec.SYSTEM_FIELDS and default_system(self))]
        return "/".join(",".join(f"{k}={path_token(getattr(self, k))}" for k in group) for group in groups)


def default_system(cell: Any) -> bool:
    """Whether a train cell (a :class:`RunSpec` or anything with its fields) holds the default system
    fields — one trusted server, the default ideal network, no staleness — whose cell ids omit them."""
    return cell.system == RunSpec.system and cell.network == RunSpec.network and cell.staleness == RunSpec.staleness


PARTITIONS: tuple[str, ...] = ("iid", "shards", "dirichlet", "longtail")
"""Worker data partitions: IID sampling from the whole set, label-sorted shards, Dirichlet(alpha),
long-tailed classes (``longtail(beta)``; :func:`dpbr.simulation.partitions.partition`)."""


def _base(spec_text: str, option: str) -> str:
    from dpbr.registry import parse

    return parse(spec_text, option=option)[0][0]


def _check_model_dataset(model: str, dataset: str) -> None:
    """Refuse model/dataset pairs whose input shapes cannot match (e.g. ``logit`` on MNIST)."""
    from dpbr import data
    from dpbr import model_catalog as models

    info = data.info(dataset)
    try:
        models.check_input(model, info.input_shape, info.num_classes)
    except ValueError as exc:
        raise UsageError("--model", str(exc)) from None


def _privacy_of(spec: "RunSpec | VNSpec") -> PrivacySpec:
    """The :class:`PrivacySpec` of a cell's (already validated) privacy fields."""
    return PrivacySpec(**{k: getattr(spec, k, None) for k in PrivacySpec.COLUMNS}, batch_size=spec.batch_size)


def replace(spec: CellSpec, **changes: Any) -> CellSpec:
    """A re-validated copy of ``spec`` with ``changes`` applied."""
    return type(spec).create(**{**spec.to_dict(), **changes})



# ----------------------------------------------------------------------------------------------- #
# VNSpec: one dpbr vn cell


_RUN_TOKEN = re.compile(r"^[0-9a-f]{12}$")


@functools.lru_cache(maxsize=256)
def vn_max_byzantine(workers: int) -> int:
    """The largest ``f`` at which some aggregation rule has a VN bound ``k_F(n, f)`` for ``n = workers``.

    A ``dpbr vn`` cell compares its measured ratio with the bounds of every rule at ``(n, f)``
    (:func:`dpbr.vn.bounds.rule_bounds`: the rules whose ``vn_bound(n, f)`` is positive); beyond this
    ``f`` none exists (every rule with a bound needs at least ``n >= 2f + 1``), so such a cell is
    refused. Found by bisection: the rules' requirements only get harder as ``f`` grows. Imports no
    torch (``dpbr.vn`` would).
    """
    from dpbr.robust import aggregators

    rules = []
    for name in aggregators.names():
        try:
            rules.append(aggregators.get(name))
        except UsageError:  # pre-aggregators (bucketing, nnm) are not rules on their own
            continue

    def bounded(f: int) -> bool:
        return any((k := rule.vn_bound(workers, f)) is not None and k > 0 for rule in rules)

    lo, hi = 0, max(int(workers) - 1, 0)  # at f = 0 every rule's bound is inf
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bounded(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def run_token(run: "RunSpec | Mapping[str, Any]") -> str:
    """Short id of the training run a checkpoint comes from: ``sha256(canonical spec JSON)[:12]``.

    ``run`` is a :class:`RunSpec` or its :meth:`~CellSpec.to_dict` (what ``dpbr train`` stores in every
    checkpoint under ``"spec"``), so the workflow (from the RunSpec) and ``dpbr vn`` (from the file)
    name the same trajectory the same way, whatever folder the checkpoints live in.
    """
    import hashlib

    data = run.to_dict() if isinstance(run, CellSpec) else dict(run)
    data.pop("kind", None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class VNSpec(CellSpec):
    """One ``dpbr vn`` cell: the VN ratio of a model at one parameter vector, batch size and privacy.

    ``run``/``step`` say where the parameters come from: ``run="init"``, ``step=0`` for the model's
    initial parameters (the same as ``dpbr train``'s step 0 with the same ``seed``), or the
    :func:`run_token` of a training run and the step of one of its checkpoints. ``samples`` is the
    number ``K`` of independent mini-batch gradients, ``reference`` the size of the large batch for
    the reference gradient (0 = the whole training split), ``bootstrap``/``confidence`` the percentile
    bootstrap interval. ``workers``/``byzantine`` are the ``n, f`` at which the rules' bounds
    ``k_F(n, f)`` are evaluated. See :mod:`dpbr.vn`.
    """

    kind: ClassVar[str] = "vn"
    layout: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("dataset", "model"),
        ("run", "step"),
        ("epsilon", "delta", "clip", "clip_mode", "sparsify"),
        ("batch_size", "workers", "byzantine", "samples", "reference", "bootstrap", "confidence"),
        ("seed",),
    )

    dataset: str = "mnist"
    model: str = "cnn"
    run: str = "init"
    step: int = 0
    epsilon: float | None = None
    delta: float = 1e-6
    clip: float | None = 0.01
    clip_mode: str = "batch"
    sparsify: float | None = None
    batch_size: int = 50
    workers: int = 11
    byzantine: int = 5
    samples: int = 64
    reference: int = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 1

    @classmethod
    def create(cls, **options: Any) -> "VNSpec":
        """Validate ``options`` (field names) and return the canonical spec.

        ``clip`` defaults to the model's (:func:`dpbr.models.default_hparams`, 0.01 for logit and cnn).

        Raises
        ------
        UsageError
            For any unknown name or value out of range, naming the option and what is allowed.
        """
        from dpbr import data
        from dpbr import model_catalog as models

        given = _option_reader(cls, options)
        dataset = data.canonical_name(str(given("dataset", cls.dataset)).strip())
        model = _model_name(given("model", cls.model), models.names())
        _check_model_dataset(model, dataset)
        hp = models.default_hparams(model)

        run = str(given("run", cls.run)).strip().lower()
        if run != "init" and not _RUN_TOKEN.match(run):
            raise UsageError("--run", f"expected 'init' or the 12-hex-digit id of a training run, got {run!r}")
        step = _int(given("step", 0), "step", low=0)
        if run == "init" and step != 0:
            raise UsageError("--step", f"must be 0 for the initial parameters (run 'init'), got {step}")

        batch_size = _int(given("batch_size", cls.batch_size), "batch_size", low=1)
        privacy = PrivacySpec.create(given, batch_size=batch_size, default_clip=hp.get("clip", cls.clip),
                                     default_delta=cls.delta, default_clip_mode=cls.clip_mode, quantize=False)
        workers = _int(given("workers", cls.workers), "workers", low=1)
        byzantine = _int(given("byzantine", cls.byzantine), "byzantine", low=0, high=max(workers - 1, 0))
        f_max = vn_max_byzantine(workers)
        if byzantine > f_max:  # the cell would have no k_F(n, f) to compare its ratio with
            raise UsageError("--byzantine", f"no aggregation rule has a VN bound k_F(n, f) at n = {workers}, "
                                            f"f = {byzantine}; allowed: 0 .. {f_max} for --workers {workers}")
        samples = _int(given("samples", cls.samples), "samples", low=2)
        reference = _int(given("reference", cls.reference), "reference", low=0)
        bootstrap = _int(given("bootstrap", cls.bootstrap), "bootstrap", low=0)
        if 0 < bootstrap < 100:
            raise UsageError("--bootstrap", f"must be 0 (no interval) or >= 100 resamples, got {bootstrap}")
        confidence = _float(given("confidence", cls.confidence), "confidence", low=0.0, high=1.0,
                            low_open=True, high_open=True)
        seed = _int(given("seed", cls.seed), "seed", low=0)
        return cls(dataset=dataset, model=model, run=run, step=step, **privacy.columns(quantize=False),
                   batch_size=batch_size, workers=workers,
                   byzantine=byzantine, samples=samples, reference=reference, bootstrap=bootstrap,
                   confidence=confidence, seed=seed)

    # -- derived views ------------------------------------------------------------------------- #

    @functools.cached_property
    def privacy(self) -> PrivacySpec:
        """The cell's privacy setting: mechanisms, spec text and label (:class:`~dpbr.privacy.spec.PrivacySpec`)."""
        return _privacy_of(self)


# ----------------------------------------------------------------------------------------------- #
# ReconSpec: one dpbr reconstruct cell


@dataclass(frozen=True)
class ReconSpec(CellSpec):
    """One ``dpbr reconstruct`` cell: a gradient-inversion attack on one batch (DLG, Zhu et al. 2019, arXiv
    1906.08935; iDLG, Zhao et al. 2020, arXiv 2001.02610; Inverting Gradients, Geiping et al. 2020, arXiv
    2003.14053).

    Fields
    ------
    dataset, model:
        An image dataset (``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, image ``synthetic``)
        and a classifier (``lenet`` — DLG's —, ``cnn``, ``resnet(...)``).
    normalize:
        Whether the model normalises its input with the dataset's mean and standard deviation, as
        every model ``dpbr train`` builds does (default ``True``). ``False`` gives DLG's original
        setting (its LeNet saw raw ``[0, 1]`` pixels); only with state ``initial``.
    state:
        ``"initial"`` (the model as ``dpbr train`` with the same seed would start: built with
        ``seed = derive_seed(seed, "model")``) or the path of a ``dpbr train --checkpoint-steps``
        file ``…/step=S.pt`` (attacks at the start, middle and near the end of training). In the cell
        id a checkpoint appears as ``<file stem>-<8 hex digits of the SHA-256 of the normalised path>``.
    attack, labels:
        ``dlg`` (labels ``soft``: optimised soft label), ``idlg`` (``infer`` from the last layer's
        gradient — iDLG —, or ``known``), ``ig`` (``known`` — as in Inverting Gradients' experiments —,
        ``infer`` or ``soft``).
    defence:
        A privacy-mechanism spec string applied to the shared gradient (``gaussian(sigma=0.01)``,
        ``sparsify(p=0.2)``, ``quantize(bits=8,kind=uniform)``, ``clip(c=1)+gaussian(...)``, ...) or None.
    batch_size:
        Images in the attacked batch, 1 … 1000.
    iterations, restarts, lr, tv:
        L-BFGS steps (DLG/iDLG, default 300) or Adam iterations (IG, default 4800); independent
        restarts (default 1); L-BFGS learning rate (default 1, DLG's) or Adam's (default 0.1, IG's);
        total-variation weight (default 0 for DLG/iDLG, 1e-4 for IG).
    seed:
        Seeds the model initialisation (state ``initial``), the choice of images, the defence's noise
        and the dummy initialisation, each from its own stream (:mod:`dpbr.rng`).
    """

    kind: ClassVar[str] = "reconstruct"
    layout: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("dataset", "model", "normalize", "state"),
        ("attack", "labels", "defence"),
        ("batch_size", "iterations", "restarts", "lr", "tv"),
        ("seed",),
    )

    dataset: str = "mnist"
    model: str = "lenet"
    normalize: bool = True
    state: str = "initial"
    attack: str = "dlg"
    labels: str = "soft"
    defence: str | None = None
    batch_size: int = 1
    iterations: int = 300
    restarts: int = 1
    lr: float = 1.0
    tv: float = 0.0
    seed: int = 1

    ATTACKS: ClassVar[tuple[str, ...]] = ("dlg", "idlg", "ig")
    LABELS: ClassVar[dict[str, tuple[str, ...]]] = {
        "dlg": ("soft",), "idlg": ("infer", "known"), "ig": ("known", "infer", "soft"),
    }
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "dlg": {"iterations": 300, "lr": 1.0, "tv": 0.0},
        "idlg": {"iterations": 300, "lr": 1.0, "tv": 0.0},
        "ig": {"iterations": 4800, "lr": 0.1, "tv": 1e-4},
    }
    MODELS: ClassVar[tuple[str, ...]] = ("lenet", "cnn", "resnet")
    MAX_BATCH: ClassVar[int] = 1000
    MAX_RESTARTS: ClassVar[int] = 1024
    #: Training privacy options ``create`` also takes (instead of ``defence``): the defence is then the
    #: training cell's mechanism pipeline at the attacked batch size (:meth:`_training_defence`).
    PRIVACY_OPTIONS: ClassVar[tuple[str, ...]] = PrivacySpec.COLUMNS

    @classmethod
    def create(cls, **options: Any) -> "ReconSpec":
        """Validate ``options`` (field names) and return the canonical spec.

        Per-attack defaults (``labels``, ``iterations``, ``lr``, ``tv``) fill what is not given
        (:attr:`DEFAULTS`, :attr:`LABELS` — the first allowed labels mode is the default).

        Raises
        ------
        UsageError
            For any unknown name or value out of range, naming the option and what is allowed.
        """
        from dpbr import data
        from dpbr.privacy import mechanisms

        options = dict(options)
        privacy_options = {k: options.pop(k) for k in cls.PRIVACY_OPTIONS if k in options}
        given = _option_reader(cls, options, none_is_default=True)
        attack = _choice(given("attack", cls.attack), "attack", list(cls.ATTACKS))
        defaults = cls.DEFAULTS[attack]
        labels = _choice(given("labels", cls.LABELS[attack][0]), "labels", list(cls.LABELS[attack]))

        dataset_text = str(given("dataset", cls.dataset)).strip()
        dataset = data.canonical_name(dataset_text)
        info = data.info(dataset)
        if info.kind != "image":
            raise UsageError("--dataset", f"{dataset!r} is not an image dataset; allowed: mnist, fashion-mnist, cifar10, "
                                          "cifar100, synthetic (images)")
        model = _model_name(given("model", cls.model), cls.MODELS, " for reconstruction")
        _check_model_dataset(model, dataset)

        state = str(given("state", cls.state)).strip()
        if not state:
            raise UsageError("--state", "expected 'initial' or the path of a dpbr train checkpoint (step=S.pt)")
        if state.lower() in ("initial", "init"):
            state = "initial"
        normalize = _bool(given("normalize", cls.normalize), "normalize")
        if not normalize and state != "initial":
            raise UsageError("--normalize", "dpbr train checkpoints are of normalising models; "
                                            "--no-normalize needs --state initial")

        defence_raw = given("defence", None)
        batch_size = _int(given("batch_size", cls.batch_size), "batch_size", low=1, high=cls.MAX_BATCH)
        if any(v is not None for v in privacy_options.values()):
            if defence_raw is not None and str(defence_raw).strip().lower() not in ("none", "null", ""):
                raise UsageError("--defence", "give either --defence or a training privacy setting "
                                              "(--epsilon, --delta, --clip, --clip-mode, --sparsify, --quantize), not both")
            defence_raw = cls._training_defence(privacy_options, batch_size)
        defence = None
        if defence_raw is not None and str(defence_raw).strip().lower() not in ("none", "null", ""):
            try:
                mech = mechanisms.get(str(defence_raw).strip())
            except UsageError as exc:
                raise UsageError("--defence", exc.message) from None
            defence = None if mech.name == "none" else mech.name

        if info.train_size is not None and batch_size > info.train_size:
            raise UsageError("--batch-size", f"{batch_size} exceeds the {info.train_size} training images of {dataset}")
        iterations = _int(given("iterations", defaults["iterations"]), "iterations", low=1)
        restarts = _int(given("restarts", cls.restarts), "restarts", low=1, high=cls.MAX_RESTARTS)
        lr = _float(given("lr", defaults["lr"]), "lr", low=0.0, low_open=True)  # finite: _float refuses inf
        tv = _float(given("tv", defaults["tv"]), "tv", low=0.0)
        seed = _int(given("seed", cls.seed), "seed", low=0)
        return cls(dataset=dataset, model=model, normalize=normalize, state=state, attack=attack, labels=labels, defence=defence,
                   batch_size=batch_size, iterations=iterations, restarts=restarts, lr=lr, tv=tv, seed=seed)

    @staticmethod
    def _training_defence(options: Mapping[str, Any], batch_size: int) -> str | None:
        """The mechanism pipeline of a training privacy setting at the attacked batch size.

        ``--epsilon 0.2 --clip 0.01`` gives ``clip(c=0.01,mode=batch)+gaussian(batch_size=b,clip=0.01,
        delta=1e-06,epsilon=0.2)``: the gradient a training worker with that setting sends, for the
        attacked batch of ``b`` images. No clipping unless ``--clip`` is given (training's default
        norm is a model default; an attack on an unclipped gradient is the usual DLG setting).
        Per-example clipping is refused: the attack sees one batch gradient.
        """
        given = lambda name, default: options.get(name) if options.get(name) is not None else default  # noqa: E731
        privacy = PrivacySpec.create(given, batch_size=batch_size, default_clip=None)
        if privacy.clip is not None and privacy.clip_mode != "batch":
            raise UsageError("--clip-mode", "reconstruct attacks one batch gradient: allowed: batch")
        return privacy.mechanism_spec()

    @property
    def privacy(self) -> PrivacySpec | None:
        """The defence as a training privacy setting (:meth:`PrivacySpec.from_mechanism_spec`, at this
        cell's batch size), or None when no training setting is this pipeline (``gaussian(sigma=…)``)."""
        return PrivacySpec.from_mechanism_spec(self.defence, batch_size=self.batch_size)

    # -- naming -------------------------------------------------------------------------------- #

    def normalization(self, dataset: Any) -> tuple[Any, Any]:
        """``(mean, std)`` the model applies: the dataset's, or ``(None, None)`` with ``normalize=False``."""
        return (dataset.mean, dataset.std) if self.normalize else (None, None)

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint file, or None for the initial model."""
        return None if self.state == "initial" else Path(self.state)

    def state_token(self) -> str:
        """``initial``, or ``<run>-<stem>-<sha256(normalised path)[:8]>`` for a checkpoint (short, path-safe):
        ``<run>`` is the checkpoint folder's name without ``.ckpt`` (the workflow's run id), ``<stem>`` the
        file's (``step=500``), so the id names the run and the step, and the digest the exact file."""
        if self.state == "initial":
            return "initial"
        import hashlib
        import os

        norm = os.path.normpath(self.state)
        digest = hashlib.sha256(norm.encode()).hexdigest()[:8]
        path = Path(norm)
        stem = path.stem or "checkpoint"
        run = path.parent.name[:-len(".ckpt")] if path.parent.name.endswith(".ckpt") else path.parent.name
        named = f"{_SAFE.sub('-', run)[:24]}-{_SAFE.sub('-', stem)[:24]}" if run else _SAFE.sub('-', stem)[:48]
        return f"{named}-{digest}"

    def cell_id(self) -> str:
        """As :meth:`CellSpec.cell_id`, with the state shown by :meth:`state_token`."""
        return "/".join(
            ",".join(f"{k}={self.state_token() if k == 'state' else path_token(getattr(self, k))}" for k in group)
            for group in self.layout
        )


def _bool(value: Any, name: str) -> bool:
    """The flag field ``name`` (:func:`dpbr.validate.boolean`, naming its option)."""
    return validate.boolean(value, option_name(name))
