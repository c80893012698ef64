"""Checks of user-given values: numbers, integers, choices, flags and component parameters.

Every check returns the normalised value or raises :class:`dpbr.errors.UsageError` (one line naming
the option and what is allowed; the command line reports it with exit code 2). The two checks used
inside component constructors that are built through :meth:`dpbr.registry.Registry.build`
(:func:`positive_index`, :func:`positive_number`) raise a plain ``ValueError`` instead: the registry
prefixes the component's name and turns it into a UsageError naming the family's option.

Importing this module imports no torch and no NumPy (the Snakefile validates its grid with it).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Mapping, Sequence

from dpbr.errors import UsageError

__all__ = [
    "FLOAT32_MAX",
    "INT64_MAX",
    "boolean",
    "choice",
    "count",
    "integer",
    "merge_params",
    "number",
    "optional_float",
    "param_bool",
    "param_factor",
    "param_float",
    "param_int",
    "param_value",
    "positive_finite",
    "positive_index",
    "positive_int",
    "positive_integral",
    "positive_number",
    "real",
]

#: Largest int64: every integer a spec holds is written to an int64 Parquet column and handed to torch.
INT64_MAX: int = 2**63 - 1

#: Largest finite float32: every number a spec holds ends up in a float32 tensor operation (a learning
#: rate of 1e39 cannot be used as ``alpha`` of a float32 update), so larger magnitudes are refused.
FLOAT32_MAX: float = 3.4028234663852886e38


def _text(x: float) -> str:
    from dpbr.registry import format_float

    return format_float(x)


# ----------------------------------------------------------------------------------------------- #
# Option values (spec fields, command-line options, configuration keys)


def integer(value: Any, option: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer within ``[low, high]`` and the int64 range (``"8"``, ``8.0`` accepted; ``True``, ``8.5`` not)."""
    high = INT64_MAX if high is None else min(high, INT64_MAX)
    if isinstance(value, bool):
        raise UsageError(option, f"expected an integer, got {value!r}")
    try:
        if isinstance(value, int):  # exact, whatever its size (a float would round beyond 2**53)
            out = int(value)
        else:
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            out = int(as_float)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(option, f"expected an integer, got {value!r}") from None
    if low is not None and out < low:
        raise UsageError(option, f"must be >= {low}, got {out}")
    if high is not None and out > high:
        raise UsageError(option, f"must be <= {high}, got {out}")
    return out


def number(value: Any, option: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite number within ``±FLOAT32_MAX`` and the given bounds (open or closed)."""
    if isinstance(value, bool):
        raise UsageError(option, f"expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(option, f"expected a number, got {value!r}") from None
    if math.isinf(out) or abs(out) > FLOAT32_MAX:
        raise UsageError(option, f"must be a finite number of magnitude at most {FLOAT32_MAX:.4g} (float32), "
                                 f"got {_text(out)}")
    too_low = low is not None and (out <= low if low_open else out < low)
    too_high = high is not None and (out >= high if high_open else out > high)
    if math.isnan(out) or too_low or too_high:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {_text(low)}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {_text(high)}")
        raise UsageError(option, f"must be {' and '.join(parts) or 'a number'}, got {_text(out)}")
    return out


def optional_float(value: Any, option: str) -> float | None:
    """``None``/``"none"``/``"null"``/``"inf"`` → ``None``; numbers and numeric strings → float.

    ``inf`` means "no privacy" for ``--epsilon`` (the study writes ε = ∞), so it maps to ``None`` too.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(option, f"expected a number or 'none', got {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isinf(value) and value > 0:
            return None
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            raise UsageError(option, f"expected a finite number or 'none', got {value!r}") from None
    text = str(value).strip().lower()
    if text in ("none", "null", "", "inf", "infinity"):
        return None
    try:
        return float(text)
    except ValueError:
        raise UsageError(option, f"expected a number or 'none', got {value!r}") from None


def choice(value: Any, option: str, allowed: Sequence[str]) -> str:
    """``value`` lower-cased and stripped, if it is one of ``allowed``."""
    text = str(value).strip().lower()
    if text not in allowed:
        raise UsageError(option, f"unknown value {value!r}; allowed: {', '.join(allowed)}")
    return text


def boolean(value: Any, option: str) -> bool:
    """A flag: a bool, or ``true/1/yes/on`` / ``false/0/no/off``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise UsageError(option, f"expected true or false, got {value!r}")


# ----------------------------------------------------------------------------------------------- #
# Values of library arguments, named in messages as ``what`` (``"epsilon must be in (0, 1)"``)


def real(value: Any, option: str, what: str) -> float:
    """``value`` as a float; refuses bools, non-numbers and NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(option, f"{what} must be a number, got {value!r}")
    x = float(value)
    if math.isnan(x):
        raise UsageError(option, f"{what} must be a number, got NaN")
    return x


def positive_finite(value: Any, option: str, what: str) -> float:
    """A finite real number > 0."""
    x = real(value, option, what)
    if not (x > 0.0 and math.isfinite(x)):
        raise UsageError(option, f"{what} must be a finite number > 0, got {x!r}")
    return x


def positive_int(value: Any, option: str, what: str, *, low: int = 1) -> int:
    """An integral real number ``>= low`` (``1``: "a positive integer"; ``0``: "a non-negative integer")."""
    kind = "positive" if low == 1 else "non-negative" if low == 0 else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer() or value < low:
        raise UsageError(option, f"{what} must be a {kind} integer, got {value!r}")
    return int(value)


def positive_integral(value: Any, option: str, what: str) -> int:
    """An integer-typed value >= 1 (``numbers.Integral``: ``8`` and ``np.int64(8)``, not ``8.0``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(option, f"{what} must be a positive integer, got {value!r}")
    return int(value)


def count(x: Any, what: str) -> int:
    """An exact integer (``operator.index``: no floats, no bools), e.g. the ``f`` a rule is called with."""
    if isinstance(x, bool):
        raise UsageError("", f"{what} must be an integer, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise UsageError("", f"{what} must be an integer, got {x!r}") from None


def positive_index(x: Any, what: str) -> int:
    """An exact integer >= 1 (a component parameter; ``ValueError``, see the module docstring)."""
    if isinstance(x, bool):
        raise ValueError(f"{what} must be a positive integer, got {x!r}")
    try:
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"{what} must be a positive integer, got {x!r}") from None
    if v < 1:
        raise ValueError(f"{what} must be a positive integer, got {x!r}")
    return v


def positive_number(x: Any, what: str) -> float:
    """A finite number > 0 (a component parameter; ``ValueError``, see the module docstring)."""
    if isinstance(x, bool):
        raise ValueError(f"{what} must be a positive number, got {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {x!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be a positive number, got {x!r}")
    return v


# ----------------------------------------------------------------------------------------------- #
# Component parameters (spec strings such as "little(factor=1.5,negative=true)")


def param_value(value: Any, key: str, name: str, option: str) -> Any:
    """``value`` unchanged unless it is a number no component can use: NaN, ±inf, a float beyond the
    float32 range (``1e39``) or an integer beyond int64."""
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise UsageError(option, f"parameter {key} of {name!r} must be a finite number of magnitude at most "
                                 f"{FLOAT32_MAX:.4g} (float32), got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        raise UsageError(option, f"parameter {key} of {name!r} must be an integer of magnitude at most 2^63 - 1, "
                                 f"got {value}")
    return value


def merge_params(option: str, name: str, given: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of one term written in its spec string (``given``) plus keyword ones (``extra``).

    The one rule for a parameter given twice, in every family: it is an error, whether the values
    agree or not (``get("krum(m=1)", m=1)``); so is a key repeated inside the string
    (``"krum(m=1,m=2)"``, refused by :func:`dpbr.registry.parse`).
    """
    both = sorted(set(given) & set(extra))
    if both:
        raise UsageError(option, f"parameter {both[0]!r} of {name!r} given twice (in the name and as a keyword)")
    return {**given, **extra}


def param_bool(option: str, name: str, value: Any) -> bool:
    """A flag parameter: a bool or ``"true"``/``"false"``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UsageError(option, f"{name} must be true or false, got {value!r}")


def param_float(option: str, name: str, value: Any, *, low: float | None = None) -> float:
    """A finite number parameter, ``>= low`` when given."""
    if isinstance(value, bool):
        raise UsageError(option, f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(option, f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UsageError(option, f"{name} must be finite, got {value!r}")
    if low is not None and x < low:
        raise UsageError(option, f"{name} must be >= {low:g}, got {value!r}")
    return x


def param_int(option: str, name: str, value: Any, *, low: int | None = None) -> int:
    """An integer parameter (``3``, ``3.0``, ``"3"``), ``>= low`` when given."""
    if isinstance(value, bool):
        raise UsageError(option, f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if not isinstance(value, int):
        raise UsageError(option, f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise UsageError(option, f"{name} must be >= {low}, got {value}")
    return value


def param_factor(option: str, name: str, value: Any, words: tuple[str, ...]) -> float | str:
    """A number parameter or one of the keywords ``words`` (``little(factor=optimal)``)."""
    if isinstance(value, str) and value.strip().lower() in words:
        return value.strip().lower()
    try:
        return param_float(option, name, value)
    except UsageError:
        raise UsageError(option, f"{name} must be a number or one of {', '.join(words)}; got {value!r}") from None
