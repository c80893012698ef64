"""The privacy setting of a cell: clipping, Gaussian noise, sparsification and quantization.

A :class:`PrivacySpec` is built once from command-line options or a configuration entry
(:meth:`PrivacySpec.create` validates every value) and gives everything else that depends on the
setting: the mechanism objects (:meth:`~PrivacySpec.after_clip_mechanism`; the clipping norm
:attr:`~PrivacySpec.clip` and :attr:`~PrivacySpec.clip_mode` are separate, because the simulation clips
inside the gradient computation), the mechanism spec text recorded with results, the Parquet columns
(:meth:`~PrivacySpec.columns`) and the human label (:func:`privacy_label`). Training (``RunSpec``) and VN
(``VNSpec``) cells hold one; a reconstruction (``ReconSpec``) cell's defence pipeline maps back to one
where a training setting is that pipeline (:meth:`PrivacySpec.from_mechanism_spec`), so the three share
one label.

The pipeline is the classic Gaussian mechanism on the clipped gradient of Guerraoui et al. 2021
(arXiv 2102.08166), optionally followed by magnitude sparsification and quantization
(:mod:`dpbr.privacy.mechanisms`; later stages are post-processing and keep the (ε, δ) guarantee).

Importing this module imports no torch (the Snakefile validates its grid with it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from dpbr import validate
from dpbr.errors import UsageError
from dpbr.registry import format_float, format_term, parse

if TYPE_CHECKING:
    from dpbr.privacy.mechanisms import Mechanism

__all__ = ["PrivacySpec", "privacy_label", "quantize_term"]


def _present(value: Any) -> bool:
    """Whether a table cell holds a value (not None, not NaN, not an empty string)."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value) != ""


def privacy_label(epsilon: float | None, sparsify: float | None, quantize: str | None = None, *,
                  ascii: bool = False) -> str:
    """Short label of a privacy setting: ``none``, ``ε=0.2``, ``sparsify=0.25``, ``ε=0.2 + sparsify=0.25``.

    Missing values may be None or NaN (cells of a table); a sparsification fraction of 0 means none.
    With ``ascii`` the label is written ``eps=0.2+sparsify=0.25`` (the ``privacy`` column of
    ``dpbr vn`` output).
    """
    parts = []
    if _present(epsilon):
        parts.append(f"{'eps' if ascii else 'ε'}={format_float(epsilon)}")  # type: ignore[arg-type]
    if _present(sparsify) and sparsify > 0:  # type: ignore[operator]
        parts.append(f"sparsify={format_float(sparsify)}")  # type: ignore[arg-type]
    if _present(quantize):
        parts.append(f"quantize={quantize}")
    return ("+" if ascii else " + ").join(parts) or "none"


def _quantizer(text: str) -> tuple[str, dict[str, Any]]:
    """``(kind, params)`` of a ``--quantize`` value: ``uniform(bits=8)``, ``sign``, ``quantize(kind=qsgd,levels=16)``."""
    terms = parse(text, option="--quantize")
    if len(terms) != 1:
        raise UsageError("--quantize", f"expected one quantizer such as 'uniform(bits=8)', got {text!r}")
    name, params = terms[0]
    if name == "quantize":
        return str(params.pop("kind", "uniform")), params
    return name, params


def quantize_term(text: str) -> str:
    """The mechanism spec of a ``--quantize`` value: ``"uniform(bits=8)" -> "quantize(bits=8,kind=uniform)"``.

    Accepted forms: a kind with parameters (``uniform(bits=8)``, ``stochastic(bits=4)``, ``sign``,
    ``qsgd(levels=16)``, ``fp16``, ``bf16``, ``log2(bits=4)``, ``kmeans(levels=16)``,
    ``fixed(int_bits=3,frac_bits=12)``) or an already complete ``quantize(...)`` term.
    """
    kind, params = _quantizer(text)
    return format_term("quantize", {**params, "kind": kind})


@dataclass(frozen=True)
class PrivacySpec:
    """The privacy setting of one cell (see the module docstring).

    Fields
    ------
    epsilon, delta:
        Per-step (ε, δ) of the Gaussian mechanism, both in (0, 1); ``epsilon=None`` means no noise.
    clip, clip_mode:
        Clipping norm C > 0 (None: no clipping) and where it applies: ``batch`` (each worker's
        mini-batch gradient) or ``per-example``.
    sparsify:
        Fraction in (0, 1) of coordinates zeroed by magnitude, or None.
    quantize:
        The quantizer as ``dpbr train --quantize`` shows it (``uniform(bits=8)``), or None.
    batch_size:
        The mini-batch size b; the Gaussian noise is calibrated to the sensitivity 2C/b.
    """

    epsilon: float | None = None
    delta: float = 1e-6
    clip: float | None = None
    clip_mode: str = "batch"
    sparsify: float | None = None
    quantize: str | None = None
    batch_size: int = 1

    CLIP_MODES: ClassVar[tuple[str, ...]] = ("batch", "per-example")
    #: The fields that are columns of a cell (and parts of its id); ``batch_size`` is a cell field of its own.
    COLUMNS: ClassVar[tuple[str, ...]] = ("epsilon", "delta", "clip", "clip_mode", "sparsify", "quantize")

    @classmethod
    def create(cls, given: Callable[[str, Any], Any], *, batch_size: int, default_clip: float | None,
               default_delta: float = 1e-6, default_clip_mode: str = "batch",
               quantize: bool = True) -> "PrivacySpec":
        """Validate the options ``given(name, default)`` returns and build the setting.

        ε and δ in (0, 1) (ε ``none`` = no noise); C > 0 and finite (``none`` = no clipping), required
        with ε because it sets the sensitivity 2C/b; sparsification fraction in [0, 1), 0 meaning none;
        ``quantize`` (when the cell has the option) a quantizer of :mod:`dpbr.privacy.mechanisms`
        (``--quantize 8`` means ``uniform(bits=8)``). ε and a sparsification fraction may be given
        together: the noised gradient is then sparsified (clip → noise → sparsify → quantize). The
        study itself never combines them.

        Raises
        ------
        UsageError
            For any value out of range, naming the option and what is allowed.
        """
        epsilon = validate.optional_float(given("epsilon", None), "--epsilon")
        if epsilon is not None:
            epsilon = validate.number(epsilon, "--epsilon", low=0.0, high=1.0, low_open=True, high_open=True)
        delta = validate.number(given("delta", default_delta), "--delta", low=0.0, high=1.0,
                                low_open=True, high_open=True)
        clip = validate.optional_float(given("clip", default_clip), "--clip")
        if clip is not None:
            if math.isinf(clip):
                raise UsageError("--clip", "must be finite (use 'none' for no clipping)")
            clip = validate.number(clip, "--clip", low=0.0, low_open=True)
        if epsilon is not None and clip is None:
            raise UsageError("--clip", "a clipping norm is required with --epsilon (it sets the sensitivity 2C/b)")
        clip_mode = validate.choice(given("clip_mode", default_clip_mode), "--clip-mode", cls.CLIP_MODES)
        sparsify = validate.optional_float(given("sparsify", None), "--sparsify")
        if sparsify is not None:
            sparsify = validate.number(sparsify, "--sparsify", low=0.0, high=1.0, high_open=True)
            if sparsify == 0.0:
                sparsify = None
        label = None
        if quantize:
            raw = given("quantize", None)
            if raw is not None and str(raw).strip().lower() not in ("none", "null", ""):
                label = _quantize_label(str(raw).strip())
        return cls(epsilon=epsilon, delta=delta, clip=clip, clip_mode=clip_mode, sparsify=sparsify,
                   quantize=label, batch_size=batch_size)

    @classmethod
    def from_mechanism_spec(cls, text: str | None, *, batch_size: int = 1) -> "PrivacySpec | None":
        """The setting a mechanism pipeline expresses, or None when no training setting does.

        ``dpbr reconstruct --defence`` takes any :mod:`dpbr.privacy.mechanisms` pipeline; the ones that
        are a training cell's privacy setting — an optional ``clip(c, mode)``, then optionally the
        calibrated ``gaussian(epsilon, delta, clip, batch_size)``, ``sparsify(p)`` and ``quantize(...)``,
        in that order — map back to a :class:`PrivacySpec` so that a reconstruction and a training cell
        share one label (:meth:`label`). ``None``/``"none"`` is the empty setting; a ``gaussian`` given
        by its ``sigma``, a composition in another order or any other mechanism gives None. A calibrated
        ``gaussian`` without a ``clip`` term still maps to its ε (the noise is what the setting adds;
        what the attacked gradient's norm was is the defence's business).

        Raises
        ------
        UsageError
            When ``text`` is not a valid mechanism spec (named ``--defence``).
        """
        if text is None or str(text).strip().lower() in ("none", "null", "", "nan"):
            return cls(batch_size=batch_size)
        terms = parse(str(text), option="--defence")
        stages = ("clip", "gaussian", "sparsify", "quantize")
        fields: dict[str, Any] = {"batch_size": batch_size}
        last = -1
        for name, params in terms:
            if name not in stages or stages.index(name) <= last:
                return None
            last = stages.index(name)
            params = dict(params)
            if name == "clip":
                if set(params) - {"c", "mode"} or "c" not in params:
                    return None
                fields["clip"] = float(params["c"])
                fields["clip_mode"] = str(params.get("mode", "batch"))
            elif name == "gaussian":
                if "epsilon" not in params or "sigma" in params:
                    return None
                fields["epsilon"] = float(params["epsilon"])
                fields["delta"] = float(params.get("delta", cls.delta))
                fields.setdefault("clip", float(params["clip"]) if "clip" in params else None)
                fields["batch_size"] = int(params.get("batch_size", batch_size))
            elif name == "sparsify":
                if set(params) != {"p"}:
                    return None
                fields["sparsify"] = float(params["p"]) or None
            else:
                kind = str(params.pop("kind", "uniform"))
                fields["quantize"] = format_term(kind, params)
        return cls(**fields)

    # -- derived views ------------------------------------------------------------------------- #

    def columns(self, *, quantize: bool = True) -> dict[str, Any]:
        """The setting as cell fields/columns (:attr:`COLUMNS`; without ``quantize`` when False)."""
        return {k: getattr(self, k) for k in self.COLUMNS if quantize or k != "quantize"}

    def label(self, *, ascii: bool = False) -> str:
        """Short human label (:func:`privacy_label`): ``none``, ``ε=0.2``, ``ε=0.2 + sparsify=0.25``."""
        return privacy_label(self.epsilon, self.sparsify, self.quantize, ascii=ascii)

    @functools.cached_property
    def _after_clip_terms(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        """``(name, params)`` of the mechanisms applied after clipping, in pipeline order."""
        terms: list[tuple[str, dict[str, Any]]] = []
        if self.epsilon is not None:
            terms.append(("gaussian", {"batch_size": self.batch_size, "clip": self.clip, "delta": self.delta,
                                       "epsilon": self.epsilon}))
        if self.sparsify is not None and self.sparsify > 0:
            terms.append(("sparsify", {"p": self.sparsify}))
        if self.quantize is not None:
            kind, params = _quantizer(self.quantize)
            terms.append(("quantize", {**params, "kind": kind}))
        return tuple(terms)

    def after_clip_spec(self) -> str | None:
        """The mechanisms after clipping as a :mod:`dpbr.privacy.mechanisms` spec string, or None.

        ``gaussian(batch_size=50,clip=0.01,delta=1e-06,epsilon=0.2)+sparsify(p=0.25)``.
        """
        return "+".join(format_term(n, p) for n, p in self._after_clip_terms) or None

    def mechanism_spec(self) -> str | None:
        """The whole pipeline (clip → gaussian → sparsify → quantize) as a spec string, or None."""
        clip = [format_term("clip", {"c": self.clip, "mode": self.clip_mode})] if self.clip is not None else []
        after = self.after_clip_spec()
        return "+".join(clip + ([after] if after else [])) or None

    def after_clip_mechanism(self) -> "Mechanism | None":
        """The mechanism applied to the clipped gradients (one mechanism, or a pipeline), or None."""
        from dpbr.privacy import mechanisms

        built = [mechanisms.registry.build(n, **p) for n, p in self._after_clip_terms]
        if not built:
            return None
        return built[0] if len(built) == 1 else mechanisms.compose(*built)


def _quantize_label(text: str) -> str:
    """The canonical ``--quantize`` value (``uniform(bits=8)``) of ``text``, checked by building it.

    A bare number means uniform quantization with that many bits (``--quantize 8``).
    """
    from dpbr.privacy import mechanisms

    if text.isdigit():
        text = f"uniform(bits={text})"
    kind, params = _quantizer(text)
    try:
        built = mechanisms.registry.build("quantize", **{**params, "kind": kind})  # validates kind and parameters
    except UsageError as exc:  # the mechanism's own label is not an option of dpbr train
        raise UsageError("--quantize", exc.message.removeprefix("quantize: ")) from None
    return format_term(built.kind, params)  # the canonical kind: k-means(levels=4) -> kmeans(levels=4)
