"""`dpbr train` against a reference step written out plainly here.

The reference is a slow, obviously-correct loop over one training run (Guerraoui et al. 2021, "Differential
privacy and Byzantine resilience in SGD: do they add up?", arXiv 2102.08166; the server step is PyTorch's SGD
with momentum, dampening 0). Per step:

1. every honest worker ``i < h = n − f_real`` draws ``b`` example indices from its own generator, seeded
   from ``(seed, "batch", i)`` — IID from the whole training set, or from its share of a non-IID split of
   the training set among the ``h`` honest workers (all ``n`` when ``f_real = 0``);
2. its mini-batch gradient comes from a plain autograd backward pass on a copy of the model (per-example
   clipping: one backward pass per example, each clipped, then averaged);
3. batch mode clips the worker's gradient to norm ``C``; worker momentum
   ``v_i ← β v_i + (1 − β) g_i`` replaces the gradient by ``v_i``;
4. the privacy mechanism: ``+ N(0, σ² I)`` with ``σ = (2C/b)·sqrt(2 ln(1.25/δ))/ε`` drawn from the worker's
   generator ``(seed, "privacy", i)``, then sparsification and quantization (dpbr's mechanisms, with the
   same per-worker generators);
5. the attack (dpbr's) sees the honest vectors *as sent* and forges ``f_real`` vectors with the generator
   ``(seed, "attack")``; label flipping computes the Byzantine workers' own gradients (worker
   ``w ≥ h`` draws IID from the whole set with ``(seed, "batch", w)``, labels ``y → C − 1 − y``, clipped
   like an honest gradient, no noise); an attack that evaluates the rule evaluates it as the server runs
   it, with the declared ``f`` (as LPD's ``attacks/identical.py`` does);
6. the rule (dpbr's) aggregates the ``n`` vectors with the *declared* ``f`` and the generator
   ``(seed, "aggregator")``;
7. ``m ← μ·m + g``, ``θ ← θ − λ·m``.

The model starts from ``models.build(..., seed=derive((seed, "model")))``. The seed derivation is
written here from its contract (SHA-256 of ``dpbr|seed|purpose|worker``), not imported.

``dpbr train`` runs through :func:`dpbr.jobs.train.train` (what the command calls) with a checkpoint at every
step, so θ is compared step by step, and its Parquet columns are compared with the reference's.

Tolerance. The reference's float32 kernels differ from dpbr's (autograd per worker against the logistic
model's closed form, a different clipping expression, ``randn·σ`` against ``normal_(0, σ)``), so values
agree to a few float32 ulps per step; over these short runs that stays below ``1e-4`` relative (θ) — a
wrong vector, generator, ``f`` or update rule changes θ by far more (checked by mutating the simulation:
``m ← μ·m + 0.5·g``, or the attack fed the gradients before the noise, fail here at the first step they
touch). A deterministic quantizer can turn that drift into a whole grid step once a value crosses a
rounding boundary, so runs with one stay short.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dpbr import data, models
from dpbr.jobs import checkpoints
from dpbr.privacy import mechanisms
from dpbr.robust import aggregators, attacks
from dpbr.simulation.partitions import partition
from dpbr.privacy.spec import quantize_term
from dpbr.spec import RunSpec
from dpbr.jobs.train import train

VECTORS = "synthetic(classes=2,d=20,n=200,n_test=40)"  # logit: d = 21
IMAGES = "synthetic(n=160,n_test=20,size=16)"           # 1×16×16, 10 classes: LeNet d = 9,466, CNN d = 56,080

#: θ and the per-step norms of dpbr and of the reference agree to this relative tolerance (see the
#: module docstring); ``ATOL`` guards coordinates that are near zero.
RTOL, ATOL = 1e-4, 1e-6

COMPARED = ["train_loss", "honest_norm", "honest_norm_clean", "aggregate_norm", "param_distance"]


# ----------------------------------------------------------------------------------------------- #
# The seeding contract, written from its definition


def derived_seed(seed: int, purpose: str, worker: int | None = None) -> int:
    """63 bits of SHA-256 of ``dpbr|<seed>|<purpose>|<worker or empty>`` (little-endian)."""
    text = f"dpbr|{seed}|{purpose}|{'' if worker is None else worker}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def seeded(seed: int, purpose: str, worker: int | None = None) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, purpose, worker))


# ----------------------------------------------------------------------------------------------- #
# The reference run


def _loss(model_name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE on the sigmoid output for the logistic model, cross-entropy otherwise (batch mean)."""
    if model_name == "logit":
        return ((out.reshape(-1) - y.to(out.dtype)) ** 2).mean()
    return F.cross_entropy(out, y)


def _clip(g: torch.Tensor, c: float) -> torch.Tensor:
    """``g · min(1, c/‖g‖)`` for one vector."""
    norm = float(torch.linalg.vector_norm(g.double()))
    return g if norm <= c else g * (c / norm)


class _Worker:
    """A copy of the model that computes the gradient of one batch at a given θ (plain autograd)."""

    def __init__(self, model: torch.nn.Module, model_name: str) -> None:
        self.model = copy.deepcopy(model)
        self.name = model_name

    def gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        torch.nn.utils.vector_to_parameters(theta.detach().clone(), self.model.parameters())
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = _loss(self.name, self.model(x), y)
            loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])
        return grad.detach().clone(), float(loss.detach())

    def clipped(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, clip: float | None,
                mode: str) -> tuple[torch.Tensor, float]:
        """The worker's gradient after clipping (batch: the mini-batch gradient; per-example: each
        example's gradient clipped, then the mean) and its mini-batch loss."""
        if clip is not None and mode == "per-example":
            rows, losses = zip(*(self.gradient(theta, x[j:j + 1], y[j:j + 1]) for j in range(len(y))))
            return torch.stack([_clip(r, clip) for r in rows]).mean(0), sum(losses) / len(losses)
        g, loss = self.gradient(theta, x, y)
        return (g if clip is None else _clip(g, clip)), loss


@dataclass
class Reference:
    thetas: list[torch.Tensor] = field(default_factory=list)   # θ_0 … θ_T
    metrics: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in COMPARED})


def reference_run(spec: RunSpec) -> Reference:
    """The run ``spec`` by the plain loop of the module docstring (CPU, float32)."""
    ds = data.load(spec.dataset, None)
    n, f_real, f_decl, b = spec.workers, spec.byzantine_real, spec.byzantine, spec.batch_size
    h = n - f_real
    model = models.build(spec.model, input_shape=ds.input_shape, num_classes=ds.num_classes, mean=ds.mean,
                         std=ds.std, seed=derived_seed(spec.seed, "model"))
    worker = _Worker(model, spec.model)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    theta0, momentum = theta.clone(), torch.zeros_like(theta)
    x_train, y_train = ds.x_train, ds.y_train
    n_train = int(y_train.shape[0])
    shares = None
    if spec.partition != "iid":  # split among the honest workers only
        shares = partition(y_train, h, spec.partition, generator=seeded(spec.seed, "partition"))
    batch_gens = [seeded(spec.seed, "batch", w) for w in range(n)]
    privacy_gens = [seeded(spec.seed, "privacy", i) for i in range(h)]
    attack_gen, rule_gen = seeded(spec.seed, "attack"), seeded(spec.seed, "aggregator")
    sigma = (2 * spec.clip / b * math.sqrt(2 * math.log(1.25 / spec.delta)) / spec.epsilon
             if spec.epsilon is not None else 0.0)
    later = [mechanisms.get("sparsify", p=spec.sparsify)] if spec.sparsify else []
    if spec.quantize is not None:
        later.append(mechanisms.get(quantize_term(spec.quantize)))
    rule, attack = aggregators.get(spec.gar), attacks.get(spec.attack)

    def server_rule(G: torch.Tensor, f: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return rule.aggregate(G, f_decl, generator=generator).value  # the rule as the server runs it

    wmom = torch.zeros(h, theta.numel())
    rule_state = attack_state = None
    out = Reference(thetas=[theta.clone()])
    for _ in range(spec.steps):
        clean, losses = [], []
        for i in range(h):
            if shares is None:
                idx = torch.randint(n_train, (b,), generator=batch_gens[i])
            else:
                idx = shares[i][torch.randint(len(shares[i]), (b,), generator=batch_gens[i])]
            g, loss = worker.clipped(theta, x_train[idx], y_train[idx], spec.clip, spec.clip_mode)
            clean.append(g)
            losses.append(loss)
        clean_t = torch.stack(clean)
        honest = clean_t
        if spec.worker_momentum > 0:
            wmom = spec.worker_momentum * wmom + (1 - spec.worker_momentum) * clean_t
            honest = wmom
        rows = []
        for i in range(h):  # the privacy noise of worker i from worker i's generator
            row = honest[i]
            if sigma > 0:
                row = row + torch.randn(row.shape, generator=privacy_gens[i]) * sigma
            rows.append(row)
        sent = torch.stack(rows)
        for m in later:
            sent = m(sent, generator=privacy_gens if m.randomized else None)
        stacked = sent
        if f_real > 0:
            own = None
            if attack.needs_own_gradients:  # label flipping: the Byzantine workers' own batches
                own_rows = []
                for w in range(h, n):
                    idx = torch.randint(n_train, (b,), generator=batch_gens[w])
                    flipped = ds.num_classes - 1 - y_train[idx]
                    own_rows.append(worker.clipped(theta, x_train[idx], flipped, spec.clip, spec.clip_mode)[0])
                own = torch.stack(own_rows)
            forged = attack.forge(sent, f_real, aggregator=server_rule, generator=attack_gen, own=own,
                                  state=attack_state)
            attack_state = forged.state
            stacked = torch.cat([sent, forged.value])
        agg = rule.aggregate(stacked, f_decl, generator=rule_gen, state=rule_state)
        rule_state = agg.state
        momentum = spec.momentum * momentum + agg.value
        theta = theta - spec.lr * momentum
        out.thetas.append(theta.clone())
        rec = out.metrics
        rec["train_loss"].append(float(np.mean(losses)))
        rec["honest_norm"].append(float(torch.linalg.vector_norm(sent.double().mean(0))))
        rec["honest_norm_clean"].append(float(torch.linalg.vector_norm(clean_t.double().mean(0))))
        rec["aggregate_norm"].append(float(torch.linalg.vector_norm(agg.value.double())))
        rec["param_distance"].append(float(torch.linalg.vector_norm((theta - theta0).double())))
    return out


# ----------------------------------------------------------------------------------------------- #
# dpbr train


def dpbr_run(spec: RunSpec, folder: Path, **options: Any) -> tuple[pd.DataFrame, list[torch.Tensor]]:
    """``dpbr train`` (library entry point) with a checkpoint at every step: (frame, [θ_0 … θ_T])."""
    out = folder / "run.parquet"
    train(spec, out=out, data_dir=folder / "data", device="cpu", checkpoint_steps=frozenset(range(spec.steps + 1)),
          **options)
    files = checkpoints.folder_files(out.with_suffix(".ckpt"))
    thetas = [checkpoints.load(p)["theta"] for p in files]
    assert [checkpoints.load(p)["step"] for p in files] == list(range(spec.steps + 1))
    return pd.read_parquet(out), thetas


def assert_same_run(spec: RunSpec, folder: Path, **options: Any) -> None:
    frame, thetas = dpbr_run(spec, folder, **options)
    ref = reference_run(spec)
    assert (frame["status"] == "completed").all()
    # θ_0: the model seeded from (seed, "model"), bit for bit
    assert torch.equal(thetas[0], ref.thetas[0])
    for t, (got, want) in enumerate(zip(thetas, ref.thetas)):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"θ at step {t}: {m}")
    rows = frame.loc[1:]
    for col in COMPARED:
        np.testing.assert_allclose(rows[col].to_numpy(), ref.metrics[col], rtol=RTOL, atol=ATOL, err_msg=col)
    # the run moved: a wrong update would not hide behind a standing θ
    assert float(torch.linalg.vector_norm(thetas[-1] - thetas[0])) > 100 * ATOL


def spec_of(**options: Any) -> RunSpec:
    base: dict[str, Any] = dict(dataset=VECTORS, model="logit", workers=7, byzantine=2, batch_size=8, steps=12,
                                lr=0.5, momentum=0.9, clip=1.0, eval_every=0, seed=5)
    base.update(options)
    return RunSpec.create(**base)


GAUSS = dict(epsilon=0.5, delta=1e-5)  # σ = 2C/b·sqrt(2 ln(1.25e5))/0.5 ≈ 2.4 for C = 1, b = 8

FAST = {
    # no privacy, no clipping, no attack: every worker honest (f_real = 0)
    "logit-none-average": dict(clip=None, gar="average"),
    # batch clipping + Gaussian noise; the attack forges from the noised vectors, the rule uses f = 2
    "logit-batch-gaussian-mda-little": dict(**GAUSS, gar="mda", attack="little(factor=1.5,negative=true)"),
    # per-example clipping + Gaussian noise
    "logit-per-example-gaussian-median-empire": dict(**GAUSS, clip_mode="per-example", gar="median", steps=6,
                                                     attack="empire(factor=1.1)"),
    # sparsification and a randomized quantizer after the noise (same per-worker generators), average:
    # every forged vector counts
    "logit-gaussian-sparsify-stochastic-average-empire": dict(**GAUSS, sparsify=0.25, quantize="stochastic(bits=4)",
                                                              gar="average", attack="empire(factor=1.1)"),
    # deterministic quantization, worker momentum, the Gaussian attack (attack generator)
    "logit-quantize-worker-momentum-trimmed-gaussian": dict(quantize="uniform(bits=6)", worker_momentum=0.9,
                                                            gar="trimmed-mean", attack="gaussian(std=0.5)"),
    # non-IID shards split among the h = 5 honest workers; label flipping (Byzantine batches IID);
    # declared f = 1, real f = 2; bucketing draws from the aggregator generator
    "logit-shards-labelflip-bucketing-median-freal2": dict(partition="shards", attack="label-flip", byzantine=1,
                                                           byzantine_real=2, gar="bucketing(s=2)+median", clip=0.5),
    # Dirichlet split among all n workers when f_real = 0; declared f = 2 (> real f = 0)
    "logit-dirichlet-all-honest-krum": dict(partition="dirichlet(alpha=0.5)", gar="krum", workers=8),
    # sign flip with a real f larger than declared (f_real = 3, f = 2)
    "logit-signflip-freal3-median": dict(gar="median", attack="sign-flip", byzantine_real=3),
    # LeNet (n·d above the windowed-metrics bound: one step per window), Gaussian noise, MDA + ALIE
    "lenet-batch-gaussian-mda-little": dict(dataset=IMAGES, model="lenet", **GAUSS, gar="mda", steps=6, lr=0.05,
                                            attack="little(factor=1.5,negative=true)"),
    # the study's CNN, few steps: Gaussian noise, average + IPM
    "cnn-batch-gaussian-average-empire": dict(dataset=IMAGES, model="cnn", **GAUSS, gar="average", steps=3, lr=0.05,
                                              attack="empire(factor=1.1)"),
}

SLOW = {
    "logit-long-mda-little": dict(**GAUSS, gar="mda", attack="little(factor=1.5,negative=true)", steps=80),
    "cnn-long-shards-mda-little": dict(dataset=IMAGES, model="cnn", **GAUSS, gar="mda", partition="shards",
                                       attack="little(factor=1.5,negative=true)", steps=20, lr=0.05),
    "lenet-per-example-gaussian-median-labelflip-shards": dict(
        dataset=IMAGES, model="lenet", **GAUSS, clip_mode="per-example", gar="median", attack="label-flip",
        partition="shards", steps=20, batch_size=4, lr=0.05),
    "lenet-sparsify-quantize-worker-momentum": dict(dataset=IMAGES, model="lenet", sparsify=0.25,
                                                    quantize="uniform(bits=8)", worker_momentum=0.5, gar="krum",
                                                    attack="sign-flip", steps=10, lr=0.05),
    "cnn-per-example-gaussian-mda-little": dict(dataset=IMAGES, model="cnn", **GAUSS, clip_mode="per-example",
                                                gar="mda", attack="little(factor=1.5,negative=true)", steps=10,
                                                batch_size=4, lr=0.05),
    "cnn-dirichlet-labelflip-freal1-trimmed": dict(dataset=IMAGES, model="cnn", partition="dirichlet(alpha=1)",
                                                   attack="label-flip", byzantine_real=1, gar="trimmed-mean",
                                                   steps=10, lr=0.05, clip=None),
}


@pytest.mark.parametrize("case", list(FAST))
def test_dpbr_train_follows_the_reference_step(case, tmp_path):
    assert_same_run(spec_of(**FAST[case]), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW))
def test_dpbr_train_follows_the_reference_step_slow(case, tmp_path):
    assert_same_run(spec_of(**SLOW[case]), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_both_gradient_strategies_follow_the_reference_step(strategy, tmp_path):
    spec = spec_of(dataset=IMAGES, model="lenet", **GAUSS, gar="mda", attack="little(factor=1.5,negative=true)",
                   steps=20, lr=0.05)
    assert_same_run(spec, tmp_path, strategy=strategy)


def test_an_optimal_attack_searches_against_the_rule_with_the_declared_f(tmp_path):
    spec = spec_of(**GAUSS, gar="mda", attack="little(factor=optimal)", byzantine=2, byzantine_real=1, steps=4)
    assert_same_run(spec, tmp_path)


def test_an_optimal_attack_with_the_declared_f_equal_to_the_real_f_follows_the_reference(tmp_path):
    spec = spec_of(**GAUSS, gar="mda", attack="little(factor=optimal)", steps=4)
    assert_same_run(spec, tmp_path)
