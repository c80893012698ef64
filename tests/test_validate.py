"""One rule for a component parameter given twice, and the privacy setting as one object."""

from __future__ import annotations

import math

import pytest

from dpbr.errors import UsageError
from dpbr.privacy import mechanisms
from dpbr.privacy.spec import PrivacySpec, privacy_label
from dpbr.robust import aggregators, attacks
from dpbr.spec import RunSpec, VNSpec

VEC = "synthetic(d=12,classes=2)"


@pytest.mark.parametrize("get, spec, option, name, key", [
    (aggregators.get, "multi-krum(m=1,m=2)", "--gar", "multi-krum", "m"),
    (aggregators.get, "multi-krum(m=2,m=2)", "--gar", "multi-krum", "m"),
    (aggregators.get, "bucketing(s=2,s=3)+krum", "--gar", "bucketing", "s"),
    (attacks.get, "little(factor=1,factor=2)", "--attack", "little", "factor"),
    (mechanisms.get, "sparsify(p=0.1,p=0.1)", "mechanism", "sparsify", "p"),
    (mechanisms.get, "clip(c=1)+gaussian(sigma=1,sigma=2)", "mechanism", "gaussian", "sigma"),
])
def test_a_parameter_repeated_in_the_spec_string_is_refused(get, spec, option, name, key):
    with pytest.raises(UsageError) as info:
        get(spec)
    assert info.value.option == option
    assert info.value.message == f"parameter {key!r} of {name!r} given twice"


@pytest.mark.parametrize("get, spec, params, option, name", [
    (aggregators.get, "multi-krum(m=1)", {"m": 2}, "--gar", "multi-krum"),
    (aggregators.get, "multi-krum(m=1)", {"m": 1}, "--gar", "multi-krum"),
    (attacks.get, "little(factor=1)", {"factor": 1}, "--attack", "little"),
    (mechanisms.get, "gaussian(sigma=1)", {"sigma": 1}, "mechanism", "gaussian"),
    (mechanisms.get, "gaussian(sigma=1)", {"sigma": 2}, "mechanism", "gaussian"),
])
def test_a_parameter_in_the_name_and_as_a_keyword_is_refused_whatever_the_values(get, spec, params, option, name):
    with pytest.raises(UsageError) as info:
        get(spec, **params)
    key = next(iter(params))
    assert info.value.option == option
    assert info.value.message == f"parameter {key!r} of {name!r} given twice (in the name and as a keyword)"


def test_a_repeated_parameter_in_a_cell_option_names_the_option():
    with pytest.raises(UsageError) as info:
        RunSpec.create(dataset=VEC, model="logit", gar="multi-krum(m=1,m=2)", workers=7, byzantine=1)
    assert info.value.option == "--gar" and "'m'" in info.value.message
    with pytest.raises(UsageError) as info:
        RunSpec.create(dataset=VEC, model="logit", quantize="uniform(bits=8,bits=8)")
    assert info.value.option == "--quantize" and "'bits'" in info.value.message


def test_distinct_parameters_still_combine():
    assert aggregators.get("multi-krum", m=2).name == "multi-krum(m=2)"
    assert attacks.get("little(factor=1.5)", negative=True).name == "little(factor=1.5,negative=true)"
    assert mechanisms.get("quantize(bits=4)", kind="stochastic").bits == 4


def test_privacy_spec_gives_the_mechanisms_after_clipping():
    C, b, eps, delta, p = 0.5, 20, 0.3, 1e-5, 0.25
    spec = RunSpec.create(dataset=VEC, model="logit", epsilon=eps, delta=delta, clip=C, sparsify=p, batch_size=b,
                          quantize="8")
    privacy = spec.privacy
    assert (privacy.clip, privacy.clip_mode, privacy.batch_size) == (C, "batch", b)
    assert privacy.after_clip_spec() == ("gaussian(batch_size=20,clip=0.5,delta=1e-05,epsilon=0.3)"
                                         "+sparsify(p=0.25)+quantize(bits=8,kind=uniform)")
    assert privacy.mechanism_spec() == "clip(c=0.5,mode=batch)+" + privacy.after_clip_spec()
    mech = privacy.after_clip_mechanism()
    assert [type(m).__name__ for m in mech] == ["Gaussian", "Sparsify", "Quantize"]
    # the Gaussian mechanism's σ = (2C/b)·sqrt(2 ln(1.25/δ))/ε (Dwork & Roth 2014, Thm A.1)
    sigma = 2 * C / b * math.sqrt(2 * math.log(1.25 / delta)) / eps
    assert list(mech)[0].sigma == pytest.approx(sigma, rel=1e-12)
    assert privacy.columns() == {"epsilon": eps, "delta": delta, "clip": C, "clip_mode": "batch", "sparsify": p,
                                 "quantize": "uniform(bits=8)"}


def test_privacy_spec_without_mechanisms():
    privacy = RunSpec.create(dataset=VEC, model="logit", clip=None).privacy
    assert privacy.after_clip_mechanism() is None and privacy.after_clip_spec() is None
    assert privacy.mechanism_spec() is None and privacy.label() == "none"
    only_clip = RunSpec.create(dataset=VEC, model="logit", clip=0.1, clip_mode="per-example").privacy
    assert only_clip.after_clip_mechanism() is None
    assert only_clip.mechanism_spec() == "clip(c=0.1,mode=per-example)"
    single = RunSpec.create(dataset=VEC, model="logit", sparsify=0.5).privacy.after_clip_mechanism()
    assert type(single).__name__ == "Sparsify" and single.p == 0.5


def test_one_label_function_in_two_spellings():
    vn = VNSpec.create(dataset="phishing", model="logit", epsilon=0.2, sparsify=0.25)
    assert vn.privacy.label() == "ε=0.2 + sparsify=0.25"
    assert vn.privacy.label(ascii=True) == "eps=0.2+sparsify=0.25"
    assert privacy_label(None, 0.0) == "none"
    assert privacy_label(float("nan"), 0.5, float("nan"), ascii=True) == "sparsify=0.5"


def test_privacy_spec_refuses_like_the_cell_options():
    given = {"epsilon": 0.5, "clip": None}.get
    with pytest.raises(UsageError) as info:
        PrivacySpec.create(lambda k, d: given(k, d), batch_size=1, default_clip=None)
    assert info.value.option == "--clip" and "required with --epsilon" in info.value.message
    with pytest.raises(UsageError) as info:
        PrivacySpec.create({"clip_mode": "rows"}.get, batch_size=1, default_clip=1.0)
    assert info.value.message == "unknown value 'rows'; allowed: batch, per-example"
