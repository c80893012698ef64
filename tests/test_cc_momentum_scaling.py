"""Centered clipping's radius scaled with the workers' momentum (Karimireddy, He & Jaggi, arXiv 2006.09365)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpbr.errors import UsageError
from dpbr.robust import aggregators as A


def _cc_numpy(X: np.ndarray, tau: float, iters: int, v0: np.ndarray) -> np.ndarray:
    """Plain centered clipping: v ← v + (1/n) Σ_i x_i' with x_i' = (x_i − v)·min(1, τ/‖x_i − v‖)."""
    v = v0.astype(float).copy()
    for _ in range(iters):
        upd = np.zeros_like(v)
        for x in X:
            y = x - v
            norm = np.linalg.norm(y)
            upd += y * (min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + upd / len(X)
    return v


@pytest.mark.parametrize("scale,beta,radius", [
    ("none", None, 10.0), ("none", 0.9, 10.0),
    ("linear", 0.9, 100.0), ("linear", 0.5, 20.0), ("linear", 0.0, 10.0),
    ("sqrt", 0.9, 10 / math.sqrt(0.1)), ("sqrt", 0.99, 100.0), ("sqrt", 0.75, 20.0),
])
def test_radius_follows_the_papers_scaling(scale, beta, radius):
    spec = f"cc(scale={scale})" if beta is None else f"cc(scale={scale},beta={beta})"
    rule = A.get(spec)
    assert rule.tau == 10.0 and rule.scale == scale
    assert rule.radius == pytest.approx(radius, rel=1e-12)


def test_known_answer_scaled_radius_clips_like_an_independent_implementation():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 5)) * 40.0  # distances far beyond τ = 2, so the radius matters
    v0 = rng.normal(size=5)
    G, state = torch.tensor(X), torch.tensor(v0)
    for spec, tau_eff in [("cc(tau=2,scale=linear,beta=0.75)", 8.0), ("cc(tau=2,scale=sqrt,beta=0.75)", 4.0),
                          ("cc(tau=2)", 2.0)]:
        got = A.get(spec).aggregate(G, 1, state=state).value.numpy()
        np.testing.assert_allclose(got, _cc_numpy(X, tau_eff, 3, v0), rtol=1e-10, atol=1e-10)
    linear = A.get("cc(tau=2,scale=linear,beta=0.75)").aggregate(G, 1, state=state).value
    same = A.get("cc(tau=8)").aggregate(G, 1, state=state).value
    torch.testing.assert_close(linear, same, rtol=0, atol=1e-12)
    # batched kernel: the same numbers slice by slice
    Gs, states = torch.stack([G, 2 * G]), torch.stack([state, -state])
    batch = A.get("cc(tau=2,scale=sqrt,beta=0.75)").aggregate(Gs, 1, state=states).value.numpy()
    for s in range(2):
        np.testing.assert_allclose(batch[s], _cc_numpy(Gs[s].numpy(), 4.0, 3, states[s].numpy()),
                                   rtol=1e-10, atol=1e-10)


def test_names_and_errors():
    assert A.get("cc").name == "centered-clipping"
    assert A.get("cc(scale=none)").name == "centered-clipping(scale=none)"  # given parameters are kept
    assert A.get("cc(scale=linear,beta=0.9)").name == "centered-clipping(beta=0.9,scale=linear)"
    assert A.get("cc", scale="sqrt", beta=0.5).name == "centered-clipping(beta=0.5,scale=sqrt)"
    with pytest.raises(UsageError, match="--gar.*scale=linear needs beta"):
        A.get("cc(scale=linear)")
    with pytest.raises(UsageError, match="--gar.*scale must be one of none, linear, sqrt"):
        A.get("cc(scale=cubic,beta=0.5)")
    for bad in ("1", "-0.1", "1.5", "true"):
        with pytest.raises(UsageError, match=r"beta .* must be a number in \[0, 1\)"):
            A.get(f"cc(scale=sqrt,beta={bad})")
