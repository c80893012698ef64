"""Gradient inversion (dpbr.inversion, dpbr reconstruct): optimiser, objective, labels, metrics, jobs, CLI.

Unit tests use synthetic data only; the MNIST recovery test (slow) is in test_inversion_mnist.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dpbr.errors import UsageError
from dpbr.inversion import metrics
from dpbr.inversion.attacks import ig_lr, ig_milestones, inverting_gradients, lbfgs_attack
from dpbr.inversion.grid import grid_array, save_grid
from dpbr.inversion.lbfgs import BatchedLBFGS, LBFGSSettings
from dpbr.inversion.objective import GradientMatching, infer_labels, last_layer_weight, total_variation
from dpbr.spec import ReconSpec

SYN = "synthetic(n=64,n_test=8,size=12)"


# ----------------------------------------------------------------------------------------------- #
# Batched L-BFGS


def _rosenbrock(z: torch.Tensor) -> torch.Tensor:
    return (100 * (z[..., 1:] - z[..., :-1] ** 2) ** 2 + (1 - z[..., :-1]) ** 2).sum(-1)


def _rosen_eval(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_(True)
    v = _rosenbrock(z)
    (g,) = torch.autograd.grad(v.sum(), z)
    return v.detach(), g


def _torch_lbfgs(z0: torch.Tensor, steps: int, history: int) -> tuple[torch.Tensor, int]:
    p = z0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([p], history_size=history)
    count = [0]

    def closure():
        opt.zero_grad()
        count[0] += 1
        v = _rosenbrock(p)
        v.backward()
        return v

    for _ in range(steps):
        opt.step(closure)
    return p.detach(), count[0]


_A = torch.randn(30, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
_SCALE = torch.logspace(0, 1.5, 8, dtype=torch.float64)


def _smooth(z: torch.Tensor) -> torch.Tensor:
    """A smooth, strictly convex, ill-conditioned test function (logistic terms + scaled quadratic + quartic)."""
    return (torch.nn.functional.softplus(z @ _A.T).mean(-1) + 0.05 * ((_SCALE * z) ** 2).sum(-1)
            + 0.01 * (z**4).sum(-1))


def _smooth_eval(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_(True)
    v = _smooth(z)
    (g,) = torch.autograd.grad(v.sum(), z)
    return v.detach(), g


@pytest.mark.parametrize("history", [100, 3])
def test_batched_lbfgs_reproduces_torch_lbfgs_for_each_restart(history):
    # same iterates as torch.optim.LBFGS (no line search) run on each restart alone, step after step
    # (on a well-behaved function; with fixed steps on e.g. Rosenbrock both are chaotic and rounding
    # differences between the compact form and the two-loop recursion grow until they show)
    settings = LBFGSSettings(history_size=history, max_iter=4)
    z0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    opt = BatchedLBFGS(z0, _smooth_eval, settings)
    refs = []
    for r in range(3):
        p = z0[r].clone().requires_grad_(True)
        refs.append((p, torch.optim.LBFGS([p], history_size=history, max_iter=4), [0]))
    for _ in range(8):
        opt.step()
        for r, (p, ref_opt, count) in enumerate(refs):
            def closure(p=p, ref_opt=ref_opt, count=count):
                ref_opt.zero_grad()
                count[0] += 1
                v = _smooth(p)
                v.backward()
                return v

            ref_opt.step(closure)
            assert torch.allclose(opt.z[r], p.detach(), rtol=0, atol=1e-12), (r, opt.z[r], p)
            # torch re-evaluates the start point of a step that follows an early stop; we reuse it
            assert int(opt.counters.evaluations[r]) <= count[0]
    assert int(opt.counters.updates.min()) > 3 * history or history == 100  # the short history wrapped around
    assert int(opt.counters.updates.min()) >= 12


def test_batched_lbfgs_restarts_are_independent():
    # restarts that stop at different iterations and steps wait for the others without being changed
    settings = LBFGSSettings(max_iter=4)
    z0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * torch.tensor([[0.1], [1], [3], [10]])
    together = BatchedLBFGS(z0, _smooth_eval, settings)
    together.run(8)
    updates = []
    for r in range(4):
        alone = BatchedLBFGS(z0[r:r + 1], _smooth_eval, settings)
        alone.run(8)
        assert torch.allclose(together.z[r], alone.z[0], rtol=0, atol=1e-12)
        assert int(together.counters.updates[r]) == int(alone.counters.updates[0])
        updates.append(int(alone.counters.updates[0]))
    assert len(set(updates)) > 1  # the restarts really did stop at different times


def test_batched_lbfgs_converges_and_freezes_on_a_quadratic():
    A = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))

    def ev(z, rows):
        return 0.5 * ((z @ A) * z).sum(1), z @ A

    opt = BatchedLBFGS(torch.ones(2, 3, dtype=torch.float64), ev)
    opt.run(50)
    assert bool(opt.frozen.all()) and not bool(opt.failed.any())
    assert float(opt.z.abs().max()) < 1e-6
    assert int(opt.counters.steps.max()) < 50  # stopped early once nothing could change


def test_batched_lbfgs_records_a_nan_restart_as_failed_and_keeps_the_others():
    def ev(z, rows):
        v, g = _rosen_eval(z, rows)
        bad = (rows == 1).unsqueeze(1) & (z[:, :1] > -100)  # restart 1 is NaN everywhere
        return torch.where(bad[:, 0], torch.nan, v), torch.where(bad, torch.nan, g)

    z0 = torch.zeros(3, 4, dtype=torch.float64)
    opt = BatchedLBFGS(z0, ev)
    opt.run(60)
    assert opt.failed.tolist() == [False, True, False]
    assert torch.equal(opt.z[1], z0[1])  # never moved
    assert torch.allclose(opt.z[0], torch.ones(4, dtype=torch.float64), atol=1e-4)


# ----------------------------------------------------------------------------------------------- #
# Objective and labels


def _toy_model(k: int = 4, seed: int = 0):
    from dpbr import models

    return models.build("lenet", input_shape=(1, 8, 8), num_classes=k, mean=(0.5,), std=(0.25,), seed=seed)


def _objective(model, x, y, *, labels, distance="l2", tv=0.0, strategy="loop"):
    from dpbr import models

    loss = models.loss("lenet")
    target = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    return GradientMatching(model, target, loss=loss, batch=x.shape[0], image_shape=x.shape[1:], num_classes=4,
                            labels=labels, mean=(0.5,), std=(0.25,), distance=distance, tv=tv, strategy=strategy,
                            mkldnn=False)


@pytest.mark.parametrize("distance,tv,labels", [("l2", 0.0, None), ("cosine", 0.01, "fixed")])
def test_objective_gradient_matches_finite_differences_and_strategies_agree(distance, tv, labels):
    torch.manual_seed(0)
    model = _toy_model().double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 3])
    obj = _objective(model, x, y, labels=y if labels else None, distance=distance, tv=tv)
    z = torch.randn(2, obj.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v, g = obj.value_and_grad(z)
    obj.strategy = "vmap"
    v2, g2 = obj.value_and_grad(z)
    assert torch.allclose(v, v2, rtol=1e-10, atol=1e-12) and torch.allclose(g, g2, rtol=1e-8, atol=1e-10)
    direction = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    eps = 1e-6
    vp, _ = obj.value_and_grad(z + eps * direction)
    vm, _ = obj.value_and_grad(z - eps * direction)
    fd = (vp - vm) / (2 * eps)
    assert torch.allclose(fd, (g * direction).sum(1), rtol=1e-4, atol=1e-7)


def test_objective_is_zero_at_the_true_images_and_labels():
    model = _toy_model().double()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([2])
    obj = _objective(model, x, y, labels=y)
    z = obj.u_from_images(x).reshape(1, -1)
    v, _ = obj.value_and_grad(z)
    assert float(v) < 1e-24
    assert torch.allclose(obj.images(z)[0], x)


@pytest.mark.parametrize("batch,restarts,labels,distance,tv,size", [
    (1, 1, None, "l2", 0.0, 8),          # DLG: one image, soft label
    (2, 3, None, "l2", 0.0, 8),          # several images and restarts (weight gradients summed per restart)
    (2, 2, "fixed", "cosine", 0.01, 9),  # IG-style objective, odd size (uneven border patches)
    (1, 2, "fixed", "l2", 0.0, 12),      # iDLG
])
def test_analytic_lenet_objective_equals_autograd(batch, restarts, labels, distance, tv, size):
    """The hand-derived second-order backprop (closed_form) gives autograd's value and gradient."""
    from dpbr import models

    model = models.build("lenet", input_shape=(1, size, size), num_classes=4, mean=(0.5,), std=(0.25,), seed=2).double()
    g = torch.Generator().manual_seed(size + batch)
    x = torch.rand(batch, 1, size, size, dtype=torch.float64, generator=g)
    y = torch.arange(batch) % 4
    loss = models.loss("lenet")
    clean = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
    # a defended (noisy) target, so that the distance and its gradient are far from zero
    noisy = [t + 0.05 * torch.randn(t.shape, dtype=t.dtype, generator=g) for t in clean]
    kw = dict(loss=loss, batch=batch, image_shape=(1, size, size), num_classes=4, labels=y if labels else None,
              mean=(0.5,), std=(0.25,), distance=distance, tv=tv, mkldnn=False)
    ref = GradientMatching(model, noisy, strategy="loop", **kw)
    fast = GradientMatching(model, noisy, strategy="analytic", **kw)
    assert fast.evaluation(restarts) == "analytic" and ref.evaluation(restarts) == "loop"
    z = torch.randn(restarts, ref.numel, dtype=torch.float64, generator=g)
    v_ref, g_ref = ref.value_and_grad(z)
    v, grad = fast.value_and_grad(z)
    assert v.shape == (restarts,) and grad.shape == z.shape and grad.dtype == torch.float64
    assert torch.allclose(v, v_ref, rtol=1e-10, atol=0.0)
    assert torch.allclose(grad, g_ref, rtol=1e-10, atol=1e-10 * float(g_ref.abs().max()))
    # restarts are independent: restart 1 alone gives the same numbers as within the batch
    if restarts > 1:
        v1, g1 = fast.value_and_grad(z[1:2])
        assert torch.allclose(v1[0], v[1], rtol=1e-12) and torch.allclose(g1[0], grad[1], rtol=1e-10, atol=1e-14)


def test_auto_strategy_picks_the_analytic_objective_only_for_lenet():
    from dpbr import models

    lenet = _toy_model()
    x, y = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1])
    auto = _objective(lenet, x, y, labels=None, strategy="auto")
    assert auto.evaluation(1) == "analytic" and auto.evaluation(3) == "analytic"
    assert _objective(lenet, x, y, labels=None, strategy="loop").evaluation(3) == "loop"
    cnn = models.build("cnn", input_shape=(1, 28, 28), num_classes=4, seed=0)
    target = [torch.zeros_like(p) for p in cnn.parameters()]
    kw = dict(loss=models.loss("cnn"), batch=1, image_shape=(1, 28, 28), num_classes=4)
    cnn_auto = GradientMatching(cnn, target, strategy="auto", **kw)
    assert cnn_auto.evaluation(1) == "loop" and cnn_auto.evaluation(2) == "vmap"
    with pytest.raises(ValueError, match="analytic"):
        GradientMatching(cnn, target, strategy="analytic", **kw)


def test_total_variation_known_answer():
    u = torch.zeros(1, 1, 3, 3)
    u[..., 1] = 1.0  # a vertical line: each row is (0, 1, 0), horizontal |diffs| (1, 1) → mean 1; vertical 0
    assert float(total_variation(u)) == pytest.approx(1.0)


def test_idlg_label_rule_known_answer_and_on_lenet():
    # hand-made last-layer gradient: row sums (+3, −2, +1, −0.5) → label 1 (most negative)
    w = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [0.5, 0.5], [0.25, -0.75]])
    assert infer_labels(w, 1).tolist() == [1]
    assert infer_labels(w, 2).tolist() == [1, 3]
    assert infer_labels(w, 3).tolist() == [1, 3, 1]  # only two negative rows: repeated in order
    # on DLG's LeNet (sigmoid features ≥ 0) the rule is exact for one image, for every class
    from dpbr import models

    model = _toy_model(k=4, seed=7)
    loss = models.loss("lenet")
    idx = last_layer_weight(model, 4)
    for label in range(4):
        x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(label))
        grads = torch.autograd.grad(loss(model(x), torch.tensor([label])), list(model.parameters()))
        assert infer_labels(grads[idx], 1).tolist() == [label]


# ----------------------------------------------------------------------------------------------- #
# Attacks


def test_dlg_recovers_a_synthetic_image_and_its_label():
    torch.manual_seed(0)
    model = _toy_model(seed=1)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    y = torch.tensor([3])
    obj = _objective(model, x, y, labels=None)
    z0 = torch.randn(2, obj.numel, generator=torch.Generator().manual_seed(12))
    res = lbfgs_attack(obj, z0, steps=100)
    dist = obj.distance_only(res.z)
    best = int(torch.argmin(dist))
    rec = obj.images(res.z[best:best + 1])[0].clamp(0, 1)
    assert float(metrics.mse(rec, x)) < 1e-4
    _, lab = obj.split(res.z[best:best + 1])
    assert int(lab[0].argmax(-1)) == 3


def test_ig_schedule_box_and_adam_match_the_reference():
    assert ig_milestones(4800) == (1799.0, 2999.0, 4203.0)  # IG's float floor division: 4800 // 1.6 = 2999.0
    assert ig_lr(0.1, 1798, 4800) == pytest.approx(0.1) and ig_lr(0.1, 1799, 4800) == pytest.approx(0.01)
    assert ig_lr(0.1, 4203, 4800) == pytest.approx(1e-4)
    model = _toy_model(seed=2).double()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    y = torch.tensor([0])
    obj = _objective(model, x, y, labels=y, distance="cosine", tv=1e-2)
    z0 = torch.randn(2, obj.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    res = inverting_gradients(obj, z0, iterations=40, lr=0.1)
    pixels = obj.images(res.z)
    assert float(pixels.min()) >= -1e-12 and float(pixels.max()) <= 1 + 1e-12
    # the same with torch.optim.Adam + MultiStepLR on the signed gradient, one restart at a time
    lo, hi = obj.box()
    for r in range(2):
        u = z0[r].clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=0.1)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(ig_milestones(40)), gamma=0.1)
        for _ in range(40):
            _, g = obj.value_and_grad(u.detach().unsqueeze(0))
            u.grad = g[0].sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                u.copy_(torch.maximum(torch.minimum(u.reshape(1, 1, 8, 8), hi), lo).reshape(-1))
        assert torch.allclose(res.z[r], u.detach(), atol=1e-10)


# ----------------------------------------------------------------------------------------------- #
# Metrics


def test_mse_and_psnr_known_answers():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.1)
    b[1] = 0.0
    assert metrics.mse(a, b).tolist() == pytest.approx([0.01, 0.0])
    p = metrics.psnr(a, b)
    assert float(p[0]) == pytest.approx(20.0) and math.isinf(float(p[1]))


def test_ssim_known_answers():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert metrics.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # constant images a, b: σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.3, 0.6, 0.01**2
    ca, cb = torch.full((1, 1, 16, 16), a, dtype=torch.float64), torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    assert float(metrics.ssim(ca, cb)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # a deterministic pair, value cross-checked with scikit-image 0.26 structural_similarity(gaussian_weights=True,
    # sigma=1.5, use_sample_covariance=False, data_range=1): -0.05319726320460955
    r = torch.arange(256, dtype=torch.float64).reshape(1, 1, 16, 16)
    assert float(metrics.ssim(r / 255.0, ((r * 7) % 256) / 255.0)) == pytest.approx(-0.05319726320461, abs=1e-12)
    w = metrics.gaussian_window()
    assert w.shape == (11, 11) and float(w.sum()) == pytest.approx(1.0) and float(w[5, 5]) == float(w.max())


def test_ssim_matches_a_direct_sliding_window_computation():
    x = torch.rand(1, 1, 13, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.rand(1, 1, 13, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = metrics.gaussian_window(11).numpy()
    X, Y = x[0, 0].numpy(), y[0, 0].numpy()
    vals = []
    for i in range(13 - 10):
        for j in range(12 - 10):
            px, py = X[i:i + 11, j:j + 11], Y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
            cxy = (w * px * py).sum() - mx * my
            c1, c2 = 0.01**2, 0.03**2
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    assert float(metrics.ssim(x, y)) == pytest.approx(float(np.mean(vals)), abs=1e-12)


def test_hungarian_matching_recovers_a_permutation_and_beats_greedy():
    g = torch.Generator().manual_seed(0)
    orig = torch.rand(5, 1, 4, 4, generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    rec = torch.empty_like(orig)
    rec[perm] = orig + 0.01 * torch.randn(orig.shape, generator=g)   # rec[perm[i]] ≈ orig[i]
    assert metrics.match(rec, orig).tolist() == perm.tolist()
    # a case where greedy matching (best pair first) is suboptimal
    orig2 = torch.tensor([0.0, 0.3]).reshape(2, 1, 1, 1)
    rec2 = torch.tensor([0.1, -3.0]).reshape(2, 1, 1, 1)
    # costs: orig0: (0.01, 9), orig1: (0.04, 10.89); greedy takes (0,0)=0.01 then (1,1)=10.89 → 10.9;
    # Hungarian: (0,1)=9 + (1,0)=0.04 → 9.04
    assert metrics.match(rec2, orig2).tolist() == [1, 0]


def test_threshold_labels():
    assert [metrics.threshold_label(t) for t in metrics.THRESHOLDS] == ["1e-2", "1e-3", "1e-4"]


# ----------------------------------------------------------------------------------------------- #
# Grid


def test_grid_layout_originals_above_reconstructions_below(tmp_path):
    orig = torch.zeros(3, 1, 4, 4)
    rec = torch.ones(3, 1, 4, 4)
    rec[1] = float("nan")
    arr = grid_array(orig, rec, columns=2, scale=2, pad=1, separator=3)
    h = 2 * (2 * 8 + 3 * 1) + 3
    assert arr.shape == (h, 2 * 8 + 3, 3) and arr.dtype == np.uint8
    assert (arr[1:9, 1:9] == 0).all()                 # original 0 (black)
    top = 19 + 3                                      # first reconstruction row
    assert (arr[top + 1:top + 9, 1:9] == 255).all()   # reconstruction 0 (white)
    assert (arr[top + 1:top + 9, 10:18] == 128).all()  # NaN shown mid-grey
    path = save_grid(orig, rec, tmp_path / "g.png")
    from PIL import Image

    default = grid_array(orig, rec)
    with Image.open(path) as img:
        assert img.size == (default.shape[1], default.shape[0])
        assert np.array_equal(np.asarray(img.convert("RGB")), default)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


# ----------------------------------------------------------------------------------------------- #
# Spec


def test_recon_spec_defaults_per_attack_and_canonical_names():
    s = ReconSpec.create()
    assert (s.attack, s.labels, s.iterations, s.lr, s.tv, s.state, s.defence) == ("dlg", "soft", 300, 1.0, 0.0, "initial", None)
    ig = ReconSpec.create(attack="ig")
    assert (ig.labels, ig.iterations, ig.lr, ig.tv) == ("known", 4800, 0.1, 1e-4)
    assert ReconSpec.create(attack="IDLG").labels == "infer"
    d = ReconSpec.create(defence="sparsify( p = 0.20 )")
    assert d.defence == "sparsify(p=0.2)" and "defence=sparsify_p=0.2" in d.cell_id()
    assert ReconSpec.create(defence="none").defence is None
    assert ReconSpec.from_dict(d.to_dict()) == d
    assert d.path().parts[:2] == ("results", "reconstruct")


def test_recon_spec_checkpoint_state_token():
    s = ReconSpec.create(state="results/train/a,b/c/step=500.pt")
    t = s.state_token()
    assert t.startswith("c-step=500-") and len(t) == len("c-step=500-") + 8  # folder, file, digest
    assert ReconSpec.create(state="runs/0123456789ab.ckpt/step=4.pt").state_token().startswith("0123456789ab-step=4-")
    assert ReconSpec.create(state="results/train/./a,b/c/step=500.pt").state_token() == t   # same file, same id
    assert ReconSpec.create(state="other/step=500.pt").state_token() != t
    assert f"state={t}" in s.cell_id() and "/" not in t


@pytest.mark.parametrize("options,option", [
    ({"attack": "dlgg"}, "--attack"),
    ({"attack": "dlg", "labels": "known"}, "--labels"),
    ({"model": "logit"}, "--model"),
    ({"model": "resnet(depth=7)"}, "--model"),
    ({"dataset": "phishing"}, "--dataset"),
    ({"dataset": "nope"}, "--dataset"),
    ({"defence": "gaussian(sigmaa=1)"}, "--defence"),
    ({"defence": "sparsify(p=2)"}, "--defence"),
    ({"batch_size": 0}, "--batch-size"),
    ({"batch_size": 1001}, "--batch-size"),
    ({"iterations": 0}, "--iterations"),
    ({"restarts": 0}, "--restarts"),
    ({"lr": 0}, "--lr"),
    ({"tv": -1}, "--tv"),
    ({"seed": -1}, "--seed"),
    ({"state": " "}, "--state"),
    ({"colour": "red"}, "--colour"),
])
def test_recon_spec_rejects_bad_values_naming_the_option(options, option):
    with pytest.raises(UsageError) as exc:
        ReconSpec.create(**options)
    assert exc.value.option == option
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------- #
# Jobs (synthetic data) and the command line


def test_reconstruct_job_writes_parquet_and_png(tmp_path):
    from dpbr.jobs.reconstruct import reconstruct
    from dpbr.io import read_metadata

    spec = ReconSpec.create(dataset=SYN, batch_size=2, restarts=2, iterations=3, defence="quantize(bits=8)")
    out, png = reconstruct(spec, out=tmp_path / "r.parquet", device="cpu")
    frame = pd.read_parquet(out)
    assert len(frame) == 2 and png.exists() and png.suffix == ".png"
    for col in ("mse", "psnr", "ssim", "label_correct", "distance", "iterations_run", "evaluations", "seconds",
                "restart", "status", "success_1e-2", "success_1e-3", "success_1e-4", "success_rate_1e-3",
                "attack", "defence", "batch_size", "seed", "cell_id"):
        assert col in frame.columns, col
    assert frame["cell_id"].iloc[0] == spec.cell_id() and frame["defence"].iloc[0] == "quantize(bits=8,kind=uniform)"
    assert sorted(frame["matched"]) == [0, 1] and (frame["status"] == "ok").all()
    assert frame["success_rate_1e-3"].iloc[0] == frame["success_1e-3"].mean()
    assert ((frame["psnr"] - 10 * np.log10(1 / frame["mse"])).abs() < 1e-4).all()
    meta = read_metadata(out)
    assert meta["spec"]["attack"] == "dlg" and "Gaussian-window" in meta["ssim"] and len(meta["images"]) == 2
    assert meta["evaluation"] == "analytic" and meta["strategy"] == "auto"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet", "r.png"]


def test_reconstruct_is_deterministic_for_a_seed(tmp_path):
    from dpbr.jobs.reconstruct import reconstruct

    spec = ReconSpec.create(dataset=SYN, attack="ig", iterations=5, seed=3)
    a = pd.read_parquet(reconstruct(spec, out=tmp_path / "a.parquet", device="cpu")[0])
    b = pd.read_parquet(reconstruct(spec, out=tmp_path / "b.parquet", device="cpu")[0])
    cols = ["index", "label", "mse", "ssim", "distance"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_a_diverging_attack_is_recorded_as_failed(tmp_path):
    from dpbr.jobs.reconstruct import reconstruct

    spec = ReconSpec.create(dataset=SYN, iterations=5, restarts=2, defence="gaussian(sigma=1e38)")  # its square overflows float32
    frame = pd.read_parquet(reconstruct(spec, out=tmp_path / "d.parquet", device="cpu")[0])
    assert (frame["status"] == "diverged").all() and frame["restarts_failed"].iloc[0] == 2
    assert frame["mse"].isna().all() and not frame["success_1e-2"].any() and frame["success_rate_1e-2"].iloc[0] == 0.0
    assert (tmp_path / "d.png").exists()


def _fake_checkpoint(tmp_path, model="lenet", dataset=SYN, seed=4, scale=0.5):
    from dpbr import data, models, rng

    info = data.info(dataset)
    m = models.build(model, input_shape=info.input_shape, num_classes=info.num_classes, seed=rng.derive_seed(seed, "model"))
    theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach() * scale
    path = tmp_path / "train.ckpt" / "step=7.pt"
    path.parent.mkdir()
    from dpbr.jobs import checkpoints

    checkpoints.save(path, step=7, theta=theta, spec={"model": model, "dataset": dataset, "seed": seed},
                     run_id=checkpoints.new_run_id())
    return path, theta


def test_reconstruct_loads_a_training_checkpoint(tmp_path):
    from dpbr import data
    from dpbr.inversion.case import build_model
    from dpbr.jobs.reconstruct import load_checkpoint

    path, theta = _fake_checkpoint(tmp_path)
    spec = ReconSpec.create(dataset=SYN, state=str(path), iterations=2)
    ckpt = load_checkpoint(spec.checkpoint, spec)
    model = build_model(spec, data.load(SYN, None), torch.device("cpu"), ckpt)
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), theta)
    other = ReconSpec.create(dataset=SYN, model="resnet", state=str(path))
    with pytest.raises(UsageError, match="--state: checkpoint is for model lenet"):
        load_checkpoint(other.checkpoint, other)


def _cli(args, capsys):
    from dpbr.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["reconstruct", *args])
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--attack", "foo"], "--attack: unknown value 'foo'"),
    (["--defence", "blur"], "--defence: unknown privacy mechanism 'blur'"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--labels", "known"], "--labels: unknown value 'known'; allowed: soft"),
    (["--iterations", "ten"], "dpbr: error:"),
    (["--state", "missing/step=5.pt"], "--state: checkpoint 'missing/step=5.pt' not found"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--threads", "0"], "Invalid value for '--threads'"),
    (["--strategy", "fast"], "--strategy: unknown strategy 'fast'"),
    (["--strategy", "analytic", "--model", "resnet"], "--strategy: 'analytic' is implemented for lenet only"),
])
def test_cli_errors_are_one_line_exit_2_and_leave_no_output(tmp_path, capsys, args, needle):
    out = tmp_path / "o.parquet"
    code, err = _cli(["--dataset", SYN, "--out", str(out), "--quiet", *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dpbr: error:") and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_runs_a_small_job(tmp_path, capsys):
    from dpbr.cli import main

    out = tmp_path / "x.parquet"
    main(["reconstruct", "--dataset", SYN, "--attack", "idlg", "--iterations", "2", "--out", str(out), "--quiet"])
    frame = pd.read_parquet(out)
    assert frame["attack"].iloc[0] == "idlg" and frame["labels"].iloc[0] == "infer" and (tmp_path / "x.png").exists()


def test_initial_state_is_the_model_dpbr_train_starts_from(tmp_path):
    """State ``initial`` with seed s = the step-0 checkpoint of ``dpbr train --seed s`` (same model)."""
    from dpbr import data
    from dpbr.inversion.case import build_model
    from dpbr.jobs.reconstruct import load_checkpoint
    from dpbr.spec import RunSpec
    from dpbr.jobs.train import train

    run = RunSpec.create(dataset=SYN, model="lenet", workers=3, byzantine=1, batch_size=4, steps=1, eval_every=0, seed=5)
    train(run, out=tmp_path / "t.parquet", data_dir=tmp_path, device="cpu", checkpoint_steps=frozenset({0, 1}))
    step0 = tmp_path / "t.ckpt" / "step=0.pt"
    ckpt_spec = ReconSpec.create(dataset=SYN, state=str(step0), seed=99)   # the recon seed does not matter here
    ds = data.load(SYN, None)
    from_ckpt = build_model(ckpt_spec, ds, torch.device("cpu"), load_checkpoint(step0, ckpt_spec))
    initial = build_model(ReconSpec.create(dataset=SYN, seed=5), ds, torch.device("cpu"), None)
    vec = torch.nn.utils.parameters_to_vector
    assert torch.equal(vec(from_ckpt.parameters()), vec(initial.parameters()))
    step1 = tmp_path / "t.ckpt" / "step=1.pt"
    trained = build_model(ckpt_spec, ds, torch.device("cpu"), load_checkpoint(step1, ckpt_spec))
    assert not torch.equal(vec(trained.parameters()), vec(initial.parameters()))


def test_png_must_differ_from_out(tmp_path, capsys):
    code, err = _cli(["--dataset", SYN, "--out", str(tmp_path / "a.parquet"), "--png", str(tmp_path / "a.parquet"),
                      "--quiet"], capsys)
    assert code == 2 and "--png: must differ from --out" in err and list(tmp_path.iterdir()) == []


def test_no_normalize_gives_dlg_s_raw_pixel_lenet():
    from dpbr import data
    from dpbr.inversion.case import prepare

    s = ReconSpec.create(dataset=SYN, normalize="false")
    assert s.normalize is False and "normalize=false" in s.cell_id()
    with pytest.raises(UsageError, match="--normalize"):
        ReconSpec.create(normalize=False, state="x/step=1.pt")
    with pytest.raises(UsageError, match="--normalize: expected true or false"):
        ReconSpec.create(normalize="maybe")
    ds = data.load(SYN, None)
    raw = prepare(s, dataset=ds, device=torch.device("cpu"))
    assert not raw.model.normalize.enabled
    assert float(raw.objective.mean.abs().max()) == 0.0 and float((raw.objective.std - 1).abs().max()) == 0.0
    normed = prepare(ReconSpec.create(dataset=SYN), dataset=ds, device=torch.device("cpu"))
    assert normed.model.normalize.enabled and torch.allclose(normed.objective.mean.flatten(), torch.tensor(ds.mean))


def test_shared_gradient_applies_the_defence_to_the_flat_gradient():
    from dpbr import models
    from dpbr.inversion.case import shared_gradient
    from dpbr.privacy import mechanisms

    model = _toy_model()
    x, y = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    clean, shared = shared_gradient(model, models.loss("lenet"), x, y, "sparsify(p=0.5)", None)
    flat_clean = torch.cat([g.reshape(-1) for g in clean])
    flat_shared = torch.cat([g.reshape(-1) for g in shared])
    assert torch.equal(flat_shared, mechanisms.get("sparsify(p=0.5)")(flat_clean.unsqueeze(0))[0])
    assert [g.shape for g in shared] == [p.shape for p in model.parameters()]
    assert int((flat_shared == 0).sum()) >= flat_clean.numel() // 2 - 2
    g1 = torch.Generator().manual_seed(9)
    _, noisy = shared_gradient(model, models.loss("lenet"), x, y, "gaussian(sigma=0.5)", g1)
    diff = torch.cat([(n - c).reshape(-1) for n, c in zip(noisy, clean)])
    assert abs(float(diff.std()) - 0.5) < 0.05   # ~ d = 5.7k draws of N(0, 0.25)


def test_cpu_backend_and_thread_rules():
    from dpbr.inversion.case import use_mkldnn
    from dpbr.jobs.reconstruct import auto_threads

    cpu = torch.device("cpu")
    assert use_mkldnn(ReconSpec.create(), (1, 28, 28), cpu) is False          # LeNet, one MNIST image
    assert use_mkldnn(ReconSpec.create(batch_size=8), (1, 28, 28), cpu) is True
    assert use_mkldnn(ReconSpec.create(model="resnet", dataset="cifar10"), (3, 32, 32), cpu) is True
    assert use_mkldnn(ReconSpec.create(), (1, 28, 28), torch.device("meta")) is None
    assert auto_threads(ReconSpec.create(), 8_920) == 1
    assert auto_threads(ReconSpec.create(batch_size=64), 431_080) is None
