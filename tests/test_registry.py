"""Spec-string grammar and canonical formatting (dpbr.registry)."""

import math

import pytest

from dpbr.errors import UsageError
from dpbr.registry import Registry, canonical, format_float, parse, parse_value


@pytest.mark.parametrize(
    "value, text",
    [(1.0, "1"), (2, "2"), (0.2, "0.2"), (1e-6, "1e-06"), (0.1 + 0.2, "0.30000000000000004"),
     (-3.0, "-3"), (1e20, "1e20"), (2.5e300, "2.5e300"), (math.inf, "inf"), (-math.inf, "-inf"),
     (math.nan, "nan")],  # no "+" in an exponent: "+" joins the terms of a spec string
)
def test_format_float_is_canonical_and_round_trips(value, text):
    assert format_float(value) == text
    if math.isfinite(value):
        assert float(text) == float(value)


def test_yaml_spellings_of_one_number_give_one_label():
    # REFERENCE §8: YAML/Paramspace render 1 as "1.0"; every spelling must name the same cell.
    assert {format_float(v) for v in (1, 1.0, float("1.0e0"), float("1e0"))} == {"1"}


def test_parse_terms_and_parameters():
    assert parse("bucketing(s=2)+krum") == [("bucketing", {"s": 2}), ("krum", {})]
    assert parse(" Multi-Krum( m = 4 , scale=0.5, flag=TRUE, mode=fast, x=none)") == [
        ("multi-krum", {"m": 4, "scale": 0.5, "flag": True, "mode": "fast", "x": None})
    ]
    assert parse_value("1e-06") == 1e-06 and isinstance(parse_value("3"), int)


def test_canonical_sorts_parameters_and_normalises_numbers():
    assert canonical("little(negative=true, factor=1.50)") == "little(factor=1.5,negative=true)"
    assert canonical("gaussian(sigma=1.0)+sparsify(p=0.25)") == "gaussian(sigma=1)+sparsify(p=0.25)"


@pytest.mark.parametrize("bad", ["", "krum(", "krum(m)", "1krum", "krum(m=1)(x=2)", "k rum"])
def test_parse_errors_are_usage_errors_naming_the_option(bad):
    with pytest.raises(UsageError) as info:
        parse(bad, option="--gar")
    assert info.value.option == "--gar"
    assert "\n" not in info.value.one_line()


def test_registry_unknown_names_and_parameters():
    reg: Registry = Registry(kind="rule", option="--gar")

    @reg.register("mean", "avg")
    def make(scale: float = 1.0):
        return ("mean", scale)

    assert reg.build("AVG", scale=2.0) == ("mean", 2.0)
    assert "avg" in reg and "median" not in reg and reg.names() == ["mean"]
    with pytest.raises(UsageError, match="allowed: mean"):
        reg.build("median")
    with pytest.raises(UsageError, match="no parameter 'm'; allowed: scale"):
        reg.build("mean", m=3)


def test_a_registered_class_carries_its_name_and_composition_inputs_are_not_spec_parameters():
    reg: Registry = Registry(kind="pre-aggregator", option="--gar")

    @reg.register("bucket", "bkt")
    class Bucket:
        def __init__(self, inner, s: int = 2):
            self.inner, self.s = inner, s

    assert (Bucket.key, Bucket.aliases) == ("bucket", ("bkt",))
    assert reg.factory("BKT") is Bucket
    built = reg.build("bkt", "rule", s=3)
    assert (built.inner, built.s) == ("rule", 3)
    # the wrapped rule comes from composition: naming it in a spec is an unknown parameter
    with pytest.raises(UsageError, match="no parameter 'inner'; allowed: s$"):
        reg.build("bucket", "rule", inner="other")
    with pytest.raises(RuntimeError, match="alias 'bkt' registered twice"):
        reg.register("other", "bkt")(type("Other", (), {}))
    with pytest.raises(RuntimeError, match="'bkt' registered twice"):
        reg.register("bkt")(type("Other", (), {}))


def test_every_family_registers_classes_that_carry_their_registered_name():
    from dpbr.privacy import mechanisms
    from dpbr.robust import aggregators, attacks

    families = [(aggregators.rules, aggregators.Aggregator), (aggregators.pre_aggregators, aggregators.Aggregator),
                (attacks.registry, attacks.Attack), (mechanisms.registry, mechanisms.Mechanism)]
    for reg, base in families:
        assert reg.names()
        for name in reg.names():
            cls = reg.factory(name)
            assert isinstance(cls, type) and issubclass(cls, base), (reg.kind, name)
            assert cls.key == name and all(reg.factory(a) is cls for a in cls.aliases), (reg.kind, name)
