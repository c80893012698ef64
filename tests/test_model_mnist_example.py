"""The MNIST-example network of the bucketing experiments (Karimireddy, He & Jaggi, arXiv 2006.09365)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from dpbr import models
from dpbr.errors import UsageError

IMG = (1, 28, 28)
NAME = "mnist-example"


def _build(name: str = NAME, seed: int = 0, **kw):
    return models.build(name, input_shape=kw.pop("input_shape", IMG), num_classes=10, seed=seed,
                        mean=[0.1307], std=[0.3081], **kw)


def test_registered_with_its_parameters_and_defaults():
    assert NAME in models.names()
    with pytest.raises(UsageError, match="--model.*no parameter 'depth'"):
        _build("mnist-example(depth=3)")
    with pytest.raises(UsageError, match="width must be a positive integer"):
        _build("mnist-example(width=0)")
    with pytest.raises(ValueError, match="6×6"):
        models.check_input(NAME, (1, 5, 5), 10)
    hp = models.default_hparams(NAME)
    assert (hp["lr"], hp["momentum"], hp["steps"], hp["eval_every"]) == (0.01, 0.0, 600, 30)


def test_exactly_1199882_parameters_and_the_examples_shapes():
    m = _build()
    # conv1 32·1·9 + 32, conv2 64·32·9 + 64, fc1 9216·128 + 128, fc2 128·10 + 10
    assert models.num_params(m) == 320 + 18_496 + 1_179_776 + 1_290 == 1_199_882
    shapes = [tuple(s) for s in models.param_shapes(m).values()]
    assert shapes == [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 9216), (128,), (10, 128), (10,)]
    wide = _build("mnist-example(width=2)")
    assert wide.fc1.in_features == 2 * 9216 and wide.conv2.out_channels == 128


def test_outputs_log_probabilities_and_the_loss_is_their_nll():
    m = _build()
    x = torch.rand(6, *IMG, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    out = m(x)
    assert out.shape == (6, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(6), rtol=0, atol=1e-5)
    assert (out <= 0).all()
    loss = models.loss(NAME)
    assert loss.name == "nll"
    manual = -out[torch.arange(6), y]
    torch.testing.assert_close(loss.per_example(out, y), manual)
    torch.testing.assert_close(loss(out, y), manual.mean())
    assert torch.equal(models.correct(NAME, out, y), out.argmax(1) == y)


def test_same_seed_same_network_and_for_run_uses_the_dataset():
    a, b, c = _build(seed=3), _build(seed=3), _build(seed=4)
    assert torch.equal(models.flat_params(a), models.flat_params(b))
    assert not torch.equal(models.flat_params(a), models.flat_params(c))
    x = torch.rand(2, *IMG, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(x), b(x))
    data = SimpleNamespace(input_shape=IMG, num_classes=10, mean=[0.1307], std=[0.3081])
    r1, r2 = models.for_run(NAME, data, 7), models.for_run(NAME, data, 7)
    assert torch.equal(models.flat_params(r1), models.flat_params(r2))
    assert models.num_params(r1) == 1_199_882


def test_no_dropout_by_default_so_vmap_grad_equals_backward_passes():
    m = _build(seed=1)
    assert m.training and m.dropout_generator is None
    loss = models.loss(NAME)
    g = torch.Generator().manual_seed(0)
    X = torch.rand(3, 4, *IMG, generator=g)
    Y = torch.randint(0, 10, (3, 4), generator=g)
    params = {n: p.detach() for n, p in m.named_parameters()}

    def f(p, x, y):
        return loss(functional_call(m, p, (x,)), y)

    batched = vmap(grad(f), in_dims=(None, 0, 0))(params, X, Y)  # would raise on a random operation
    for i in range(3):
        m.zero_grad()
        loss(m(X[i]), Y[i]).backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(batched[n][i], p.grad, rtol=1e-4, atol=1e-6)
    # training mode without a generator is the evaluation function
    x = X[0]
    train_out = m(x)
    m.eval()
    assert torch.equal(train_out, m(x))


def test_seeded_dropout_is_reproducible_and_off_in_eval_mode():
    m = _build(seed=2)
    x = torch.rand(8, *IMG, generator=torch.Generator().manual_seed(5))
    plain = m(x)
    m.dropout_generator = torch.Generator().manual_seed(11)
    first = m(x)
    m.dropout_generator = torch.Generator().manual_seed(11)
    again = m(x)
    m.dropout_generator = torch.Generator().manual_seed(12)
    other = m(x)
    assert torch.equal(first, again)
    assert not torch.allclose(first, plain) and not torch.allclose(first, other)
    torch.testing.assert_close(first.exp().sum(1), torch.ones(8), rtol=0, atol=1e-5)
    m.eval()
    assert torch.equal(m(x), plain)


def test_hidden_dropout_keeps_about_half_the_units_scaled_by_two():
    m = _build(seed=0)
    m.dropout_generator = torch.Generator().manual_seed(0)
    h = torch.ones(4000, 128)
    out = m._dropout(h, 0.5)
    kept = out != 0
    assert torch.equal(out[kept], torch.full_like(out[kept], 2.0))
    frac = kept.double().mean().item()
    assert abs(frac - 0.5) < 0.01  # 512,000 Bernoulli(0.5) draws: sd 0.0007


def test_a_few_sgd_steps_decrease_the_loss_on_mnist_shaped_data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(4)  # 40 images, 4 per class, a class-dependent bright row
    x = 0.1 * torch.rand(40, *IMG, generator=g)
    x[torch.arange(40), 0, 2 + 2 * y, :] = 1.0
    m = _build(seed=0)
    loss = models.loss(NAME)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        value = loss(m(x), y)
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[0] == pytest.approx(2.303, abs=0.1)  # log 10 at initialisation
    assert losses[-1] < 0.7 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))
