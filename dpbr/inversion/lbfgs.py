"""Independent L-BFGS runs, batched: ``R`` problems advanced together, each exactly as alone.

Why not ``torch.optim.LBFGS`` on a sum of objectives?
    Minimising ``Σ_r f_r(z_r)`` with one L-BFGS couples the runs: the two-loop recursion uses inner
    products over the *concatenated* vector, so the curvature pairs, the scaling ``γ = sᵀy / yᵀy``,
    the step size and every stopping test (``|Δloss| < tol`` on the *summed* loss, ``max |g| < tol``
    over all runs) mix the restarts. The result is neither DLG's algorithm nor independent restarts.

What this module does instead
    One state per problem ``r`` (history ``S_r, Y_r``, ``γ_r``, direction, step size, stopping flags)
    and the update rules of ``torch.optim.LBFGS`` (PyTorch 2.x, ``line_search_fn=None``) applied to
    each problem separately, with tensors batched over ``r``. Only the *evaluation* is shared: the
    caller's ``evaluate(z, rows)`` returns the value and gradient of every requested problem at once
    (a sum of independent objectives has exactly the per-problem gradients as its gradient, so one
    backward pass serves all of them). Problems that stop early inside a step wait (masked) until the
    others finish that step, so every problem sees exactly the sequence of updates it would see alone.

One *step* (what DLG's ``for i in range(300): optimizer.step(closure)`` counts)
    = one call of ``torch.optim.LBFGS.step`` with DLG's settings: ``lr = 1``, ``max_iter = 20``,
    ``max_eval = 25``, ``history_size = 100``, ``tolerance_grad = 1e-7``, ``tolerance_change = 1e-9``,
    no line search. It evaluates the objective, then makes up to ``max_iter`` parameter updates
    ``z ← z + t·d`` (``t = min(1, 1/‖g‖₁)·lr`` at the very first iteration, ``lr`` afterwards),
    re-evaluating after every update except the last, and stops early when ``max |g| ≤ tolerance_grad``,
    ``gᵀd > −tolerance_change``, ``max |t·d| ≤ tolerance_change`` or ``|Δloss| < tolerance_change``.

Differences from ``torch.optim.LBFGS`` (none changes an iterate):
    * the inverse-Hessian product uses the compact representation of Byrd, Nocedal & Schnabel (1994,
      eq. 2.17/3.1) — two small triangular solves and four batched mat-vecs instead of the two-loop
      recursion's ``4·history`` Python-level vector operations; in exact arithmetic both give the same
      ``H g`` (the small ``m×m`` system is solved in float64);
    * the objective is not re-evaluated at the start of a step when the parameters have not moved
      since the last evaluation (``torch`` evaluates that point twice when a step ends early);
    * a problem whose state can no longer change (``max |g| ≤ tolerance_grad`` at the start of a
      step, or ``gᵀd > −tolerance_change``: ``torch`` would repeat the same no-op forever) is frozen and
      not evaluated again, and a problem whose value or gradient is not finite is frozen as *failed*;
      when every problem is frozen the remaining steps are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = ["BatchedLBFGS", "LBFGSSettings"]

Evaluate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``evaluate(z_rows, rows) -> (values (k,), gradients (k, n))`` for the problems ``rows`` (k,)."""


@dataclass(frozen=True)
class LBFGSSettings:
    """``torch.optim.LBFGS`` settings (defaults = PyTorch's = DLG's, which keeps them)."""

    lr: float = 1.0
    max_iter: int = 20
    max_eval: int | None = None  # None → max_iter * 5 // 4, as in torch
    history_size: int = 100
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9

    @property
    def max_evals(self) -> int:
        return self.max_eval if self.max_eval is not None else self.max_iter * 5 // 4


@dataclass
class _Counters:
    steps: Tensor          # L-BFGS steps in which the problem was active
    updates: Tensor        # parameter updates z ← z + t d
    evaluations: Tensor    # objective evaluations actually made


class BatchedLBFGS:
    """``R`` independent L-BFGS problems of dimension ``n`` advanced in lock-step.

    Parameters
    ----------
    z:
        Starting points, shape ``(R, n)``; the optimiser owns a copy (``self.z``).
    evaluate:
        ``evaluate(z_rows, rows) -> (values, gradients)``; must treat rows independently.
    settings:
        :class:`LBFGSSettings`.

    Attributes
    ----------
    z, value, grad:
        Current points, their objective values and gradients (``value`` NaN before the first step).
    frozen, failed:
        ``(R,)`` flags: no further change possible / objective became non-finite.
    counters:
        Per-problem ``steps``, ``updates`` and ``evaluations`` (int64 tensors).
    """

    def __init__(self, z: Tensor, evaluate: Evaluate, settings: LBFGSSettings = LBFGSSettings()) -> None:
        if z.dim() != 2:
            raise ValueError(f"z must have shape (R, n), got {tuple(z.shape)}")
        self.settings = settings
        self.evaluate_fn = evaluate
        R, n = z.shape
        m = int(settings.history_size)
        dev, dt = z.device, z.dtype
        self.R, self.n, self.m = R, n, m
        self.z = z.detach().clone()
        self.value = torch.full((R,), float("nan"), device=dev, dtype=dt)
        self.grad = torch.zeros(R, n, device=dev, dtype=dt)
        self.cached = torch.zeros(R, dtype=torch.bool, device=dev)   # value/grad valid at z
        self.frozen = torch.zeros(R, dtype=torch.bool, device=dev)
        self.failed = torch.zeros(R, dtype=torch.bool, device=dev)
        # L-BFGS state (torch keeps it across step() calls)
        self.d = torch.zeros(R, n, device=dev, dtype=dt)
        self.t = torch.zeros(R, device=dev, dtype=dt)
        self.prev_grad = torch.zeros(R, n, device=dev, dtype=dt)
        self.prev_value = torch.zeros(R, device=dev, dtype=dt)
        self.h_diag = torch.ones(R, device=dev, dtype=torch.float64)
        # history in chronological order, oldest first; the first m - count slots are empty (zero).
        # One buffer holds S (rows 0..m-1) and Y (rows m..2m-1) so that one mat-vec serves both.
        self.SYbuf = torch.zeros(R, 2 * m, n, device=dev, dtype=dt)
        # Rm = upper triangle of SᵀY (Rm[i, j] = s_i · y_j, i <= j), with 1 on the diagonal of empty
        # slots so that the triangular solves are defined (their rows and columns are zero otherwise)
        self.Rm = torch.eye(m, device=dev, dtype=torch.float64).repeat(R, 1, 1)
        self.YY = torch.zeros(R, m, m, device=dev, dtype=torch.float64)
        self.count = torch.zeros(R, dtype=torch.long, device=dev)         # stored pairs (<= m)
        self.iterations = 0                                              # torch's state["n_iter"] (lock-step)
        self.counters = _Counters(*(torch.zeros(R, dtype=torch.long, device=dev) for _ in range(3)))
        self._arange_m = torch.arange(m, device=dev)
        self._all_rows = torch.arange(R, device=dev)

    # ------------------------------------------------------------------------------------------ #

    @property
    def active(self) -> Tensor:
        """Problems that can still change."""
        return ~self.frozen

    def _evaluate(self, mask: Tensor, count: int | None = None) -> None:
        """Evaluate the problems in ``mask`` (``count`` of them, if known) at ``z``; mark non-finite
        ones failed (and frozen). The optimiser keeps the tensors ``evaluate`` returns."""
        n = int(mask.sum()) if count is None else count
        if n == 0:
            return
        if n == self.R:
            values, grads = self.evaluate_fn(self.z, self._all_rows)
            self.value = values.detach().to(self.value.dtype)
            self.grad = grads.detach().to(self.grad.dtype)
            self.cached = torch.ones_like(self.cached)
            self.counters.evaluations += 1
            bad = ~(torch.isfinite(self.value) & torch.isfinite(self.grad).all(1))
        else:
            rows = mask.nonzero().squeeze(1)
            values, grads = self.evaluate_fn(self.z[rows], rows)
            # out of place: earlier iterations may still hold references to value/grad
            self.value = self.value.index_put((rows,), values.detach().to(self.value.dtype))
            self.grad = self.grad.index_put((rows,), grads.detach().to(self.grad.dtype))
            self.cached = self.cached | mask
            self.counters.evaluations += mask.long()
            bad = mask & ~(torch.isfinite(self.value) & torch.isfinite(self.grad).all(1))
        self.failed |= bad
        self.frozen |= bad

    @property
    def S(self) -> Tensor:
        """Steps ``s_i`` ``(R, m, n)``, oldest first (a view)."""
        return self.SYbuf[:, : self.m]

    @property
    def Y(self) -> Tensor:
        """Gradient differences ``y_i`` ``(R, m, n)``, oldest first (a view)."""
        return self.SYbuf[:, self.m:]

    def _add_pairs(self, accept: Tensor, s: Tensor, y: Tensor, every: bool) -> None:
        """Append ``(s, y)`` to the histories of the problems in ``accept`` (``every``: all of them),
        dropping the oldest pair of a full history."""
        m = self.m
        buf = torch.cat([self.SYbuf[:, 1:m], s.unsqueeze(1), self.SYbuf[:, m + 1:], y.unsqueeze(1)], dim=1)
        # (R, 1, 2m): y_new against every stored s_i (first m) and y_j (last m), the new pair included
        # (a (1, n) × (n, 2m) bmm with the transposed buffer: far faster than buffer @ vector on CPU)
        P = torch.bmm(y.unsqueeze(1), buf.transpose(1, 2)).double()
        Rm = torch.nn.functional.pad(self.Rm[:, 1:, 1:], (0, 1, 0, 1))
        Rm[:, :, -1] = P[:, 0, :m]          # s_i · y_new: the new column of the upper triangle
        YY = torch.nn.functional.pad(self.YY[:, 1:, 1:], (0, 1, 0, 1))
        YY[:, -1, :] = P[:, 0, m:]
        YY[:, :, -1] = P[:, 0, m:]
        if every:
            self.SYbuf, self.Rm, self.YY = buf, Rm, YY
        else:
            a3 = accept.view(-1, 1, 1)
            self.SYbuf = torch.where(a3, buf, self.SYbuf)
            self.Rm = torch.where(a3, Rm, self.Rm)
            self.YY = torch.where(a3, YY, self.YY)
        self.count = torch.where(accept, torch.clamp(self.count + 1, max=self.m), self.count)

    def _direction(self) -> Tensor:
        """``−H g`` for every problem (compact L-BFGS representation, Byrd et al. 1994)."""
        m = self.m
        g = self.grad
        gamma = self.h_diag.view(-1, 1, 1)                                    # (R, 1, 1) float64
        PQ = torch.bmm(g.unsqueeze(1), self.SYbuf.transpose(1, 2)).double()   # (R, 1, 2m): [Sᵀg, Yᵀg]
        p = PQ[:, 0, :m].unsqueeze(2)
        q = PQ[:, 0, m:].unsqueeze(2)
        # empty slots hold zero vectors, so p, q, YY and w1 are zero there (their diagonal 1 is harmless)
        Rm = self.Rm
        Dg = torch.diagonal(Rm, dim1=1, dim2=2).unsqueeze(2)
        w1 = torch.linalg.solve_triangular(Rm, p, upper=True)               # R⁻¹ Sᵀg
        rhs = Dg * w1 + gamma * (torch.bmm(self.YY, w1) - q)
        top = torch.linalg.solve_triangular(Rm.transpose(1, 2), rhs, upper=False)
        coef = torch.cat([top, -gamma * w1], dim=1).transpose(1, 2).to(g.dtype)   # (R, 1, 2m)
        Hg = self.h_diag.to(g.dtype).unsqueeze(1) * g + torch.bmm(coef, self.SYbuf).squeeze(1)
        return -Hg

    # ------------------------------------------------------------------------------------------ #

    def step(self) -> Tensor:
        """One L-BFGS step for every active problem; returns the values at the start of the step.

        (Masks select the problems still running; when all are, the plain tensors are used.)
        """
        st = self.settings
        R = self.R
        self._evaluate(self.active & ~self.cached)
        start_value = self.value.clone()
        running = self.active.clone()
        self.counters.steps += running.long()
        converged = running & (self.grad.abs().amax(1) <= st.tolerance_grad)
        self.frozen |= converged
        running &= ~converged
        n_iter = 0
        while True:
            n_running = int(running.sum())
            if n_running == 0:
                break
            full = n_running == R
            n_iter += 1
            self.iterations += 1
            g = self.grad
            # -- direction ------------------------------------------------------------------- #
            if self.iterations == 1:
                d = -g
            else:
                y = g - self.prev_grad
                s = self.d * self.t.unsqueeze(1)
                ys = (y * s).sum(1)
                accept = running & (ys > 1e-10)
                n_accept = int(accept.sum())
                if n_accept:
                    self._add_pairs(accept, s, y, n_accept == R)
                    h = (ys / (y * y).sum(1)).double()
                    self.h_diag = h if n_accept == R else torch.where(accept, h, self.h_diag)
                d = self._direction()
            # -- step length ----------------------------------------------------------------- #
            if self.iterations == 1:
                t = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * st.lr
            else:
                t = torch.full_like(self.t, st.lr)
            if full:
                self.d, self.prev_grad, self.prev_value, self.t = d, g, self.value, t
            else:
                r1 = running.unsqueeze(1)
                self.d = torch.where(r1, d, self.d)
                self.prev_grad = torch.where(r1, g, self.prev_grad)
                self.prev_value = torch.where(running, self.value, self.prev_value)
                self.t = torch.where(running, t, self.t)
            gtd = (g * d).sum(1)
            stuck = running & (gtd > -st.tolerance_change)   # torch would repeat this no-op forever
            self.frozen |= stuck
            move = running & ~stuck
            n_move = int(move.sum())
            step_vec = t.unsqueeze(1) * d
            if n_move == R:
                self.z = self.z + step_vec
            else:
                self.z = torch.where(move.unsqueeze(1), self.z + step_vec, self.z)
            self.cached = self.cached & ~move
            self.counters.updates += move.long()
            done = stuck
            if n_iter != st.max_iter:
                self._evaluate(move, n_move)
                if 1 + n_iter >= st.max_evals:
                    done = done | move
                else:
                    stop = (
                        self.failed
                        | (self.grad.abs().amax(1) <= st.tolerance_grad)
                        | (step_vec.abs().amax(1) <= st.tolerance_change)
                        | ((self.value - self.prev_value).abs() < st.tolerance_change)
                    )
                    done = done | (move & stop)
            else:
                done = done | move
            running = running & ~done
        return start_value

    def run(self, steps: int, callback: Callable[[int], None] | None = None) -> None:
        """Take up to ``steps`` steps; stop early once every problem is frozen."""
        for i in range(steps):
            if not bool(self.active.any()):
                break
            self.step()
            if callback is not None:
                callback(i + 1)
