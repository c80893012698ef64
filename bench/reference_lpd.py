"""A straightforward reference parameter server, written the way the public anchors do it.

Used only by ``bench/bench_train.py`` to measure how much faster ``dpbr train`` is. It follows the
LPD ``train.py`` / ``aggregators/brute.py`` / ``attacks/identical.py`` structure (LPD-EPFL/DifferentialByzantine, the code of arXiv 2102.08166):

* a Python loop over honest workers, one backward pass each, gradients copied out of ``.grad``;
* clipping with ``grad.norm().item()`` per worker;
* per-step noise drawn with ``torch.distributions.Normal(...).sample()`` per worker;
* the "little" attack from ``torch.stack(...).std(0)``;
* MDA ("brute") as a Python loop over the ``C(n, n−f)`` subsets with a host sync per pair distance;
* the update through ``torch.optim.SGD`` with momentum;
* the per-step "study" quantities of LPD's ``train.py`` (honest and attack gradient norm average,
  norm deviation, max coordinate, aggregate norm, cosines, distance from the origin), each read to
  the host with ``.item()`` as ``tools.compute_avg_dev_max`` does — dpbr records the same quantities.

It computes the same quantities as the dpbr step (same model, loss, batch size, noise scale, rule,
attack), so the ratio of steps per second compares implementations, not workloads.
"""

from __future__ import annotations

import itertools
import math

import torch

from dpbr import models


def gaussian_sigma(clip: float, batch_size: int, epsilon: float, delta: float) -> float:
    """σ = (2C/b)·sqrt(2 ln(1.25/δ))/ε (the anchor computes it inline)."""
    return (2 * clip / batch_size) * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


class ReferenceServer:
    """One LPD-style training loop for ``mda`` + ``little(factor=1.5, negative=true)`` (or average)."""

    def __init__(self, spec, dataset, seed: int = 1, device: torch.device | str = "cpu") -> None:
        torch.manual_seed(seed)
        self.spec = spec
        self.device = torch.device(device)
        self.data = dataset.to(self.device)
        self.model = models.build(spec.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                                  mean=dataset.mean, std=dataset.std, seed=seed).to(self.device)
        self.loss = models.loss(spec.model)
        self.params = list(self.model.parameters())
        self.origin = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()
        self.records: list[list[float]] = []
        self.opt = torch.optim.SGD(self.params, lr=spec.lr, momentum=spec.momentum, dampening=0)
        d = sum(p.numel() for p in self.params)
        self.noise = None
        if spec.epsilon is not None:
            sigma = gaussian_sigma(spec.clip, spec.batch_size, spec.epsilon, spec.delta)
            self.noise = torch.distributions.normal.Normal(torch.zeros(d, device=self.device),
                                                           torch.ones(d, device=self.device).mul_(sigma))

    def _honest_gradient(self) -> torch.Tensor:
        idx = torch.randint(self.data.y_train.shape[0], (self.spec.batch_size,), device=self.device)
        self.opt.zero_grad()
        loss = self.loss(self.model(self.data.x_train[idx]), self.data.y_train[idx])
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in self.params]).clone().detach()
        if self.spec.clip is not None:
            norm = grad.norm().item()
            if norm > self.spec.clip:
                grad.mul_(self.spec.clip / norm)
        return grad

    @staticmethod
    def _mda(grads: list[torch.Tensor], f: int) -> torch.Tensor:
        n = len(grads)
        dist = {}
        for i, j in itertools.combinations(range(n), 2):
            dist[i, j] = grads[i].sub(grads[j]).norm().item()
        best, best_diam = None, math.inf
        for subset in itertools.combinations(range(n), n - f):
            diam = 0.0
            for i, j in itertools.combinations(subset, 2):
                d = dist[i, j]
                if not math.isfinite(d):
                    diam = math.inf
                    break
                diam = max(diam, d)
            if diam < best_diam:
                best, best_diam = subset, diam
        assert best is not None
        return torch.stack([grads[i] for i in best]).mean(0)

    @staticmethod
    def _avg_dev_max(samples: list[torch.Tensor]) -> tuple[torch.Tensor | None, float, float, float]:
        if not samples:
            return None, math.nan, math.nan, math.nan
        avg = samples[0].clone().detach_()
        for g in samples[1:]:
            avg.add_(g)
        avg.div_(len(samples))
        norm_avg = avg.norm().item()
        norm_max = avg.abs().max().item()
        norm_dev = math.nan
        if len(samples) >= 2:
            var = 0.0
            for g in samples:
                c = g.sub(avg)
                var += c.dot(c).item()
            norm_dev = math.sqrt(var / (len(samples) - 1))
        return avg, norm_avg, norm_dev, norm_max

    def _study(self, honest: list[torch.Tensor], attack: list[torch.Tensor], agg: torch.Tensor) -> list[float]:
        h_avg, h_norm, h_dev, h_max = self._avg_dev_max(honest)
        a_avg, a_norm, a_dev, a_max = self._avg_dev_max(attack)
        d_norm = agg.norm().item()
        d_max = agg.abs().max().item()
        cos_hd = torch.dot(h_avg, agg).div_(h_norm).div_(d_norm).item()
        cos_ha = math.nan if a_avg is None else torch.dot(h_avg, a_avg).div_(h_norm).div_(a_norm).item()
        cos_ad = math.nan if a_avg is None else torch.dot(a_avg, agg).div_(a_norm).div_(d_norm).item()
        origin = torch.cat([p.detach().reshape(-1) for p in self.params]).sub(self.origin).norm().item()
        return [h_norm, h_dev, h_max, a_norm, a_dev, a_max, d_norm, d_max, cos_hd, cos_ha, cos_ad, origin]

    def step(self) -> None:
        spec = self.spec
        h = spec.workers - spec.byzantine_real
        grads = [self._honest_gradient() for _ in range(h)]
        if self.noise is not None:
            for g in grads:
                g.add_(self.noise.sample())
        honest = grads
        attack: list[torch.Tensor] = []
        if spec.byzantine_real > 0:
            stacked = torch.stack(grads)
            byz = stacked.mean(0) - 1.5 * stacked.std(0)
            attack = [byz] * spec.byzantine_real
            grads = grads + attack
        agg = self._mda(grads, spec.byzantine) if spec.gar.startswith("mda") else torch.stack(grads).mean(0)
        self.records.append(self._study(honest, attack, agg))
        offset = 0
        for p in self.params:
            p.grad = agg[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.opt.step()
