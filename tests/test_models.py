"""Models: exact parameter counts, deterministic init, normalisation buffers, task facts, vmap(grad)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from dpbr import models
from dpbr.errors import UsageError

IMG = (1, 28, 28)


def test_names():
    assert models.names() == ["cnn", "lenet", "logit", "mnist-example", "resnet"]
    with pytest.raises(UsageError, match="--model.*unknown model 'vgg'"):
        models.build("vgg", input_shape=IMG, num_classes=10, seed=0)
    with pytest.raises(UsageError, match="no parameter 'depth'"):
        models.build("cnn(depth=3)", input_shape=IMG, num_classes=10, seed=0)
    with pytest.raises(UsageError, match="6n\\+2"):
        models.build("resnet(depth=21)", input_shape=(3, 32, 32), num_classes=10, seed=0)


def test_cnn_has_exactly_the_studys_431080_parameters():
    m = models.build("cnn", input_shape=IMG, num_classes=10, seed=0)
    assert models.num_params(m) == 431_080
    shapes = [tuple(s) for s in models.param_shapes(m).values()]
    assert shapes == [(20, 1, 5, 5), (20,), (50, 20, 5, 5), (50,), (500, 800), (500,), (10, 500), (10,)]
    assert m(torch.rand(2, *IMG)).shape == (2, 10)
    # 3-channel 32x32 input: sizes derived from the input shape (Linear(1250, 500))
    m3 = models.build("cnn", input_shape=(3, 32, 32), num_classes=10, seed=0)
    assert m3.fc1.in_features == 50 * 5 * 5
    assert m3(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_logit_d69_mse_loss_and_accuracy_rule():
    m = models.build("logit", input_shape=(68,), num_classes=2, seed=0)
    assert models.num_params(m) == 69
    x = torch.rand(5, 68)
    out = m(x)
    assert out.shape == (5,) and ((out > 0) & (out < 1)).all()
    out = torch.tensor([0.9, 0.2, 0.6, 0.4])
    y = torch.tensor([1, 0, 0, 1])
    loss = models.loss("logit")
    assert loss.name == "mse"
    expected = ((out - y.float()) ** 2).mean()
    assert torch.allclose(loss(out, y), expected)
    assert torch.allclose(models.per_example_loss("logit")(out, y), (out - y.float()) ** 2)
    assert models.correct("logit", out, y).tolist() == [True, True, False, False]
    with pytest.raises(UsageError, match="binary"):
        models.build("logit", input_shape=IMG, num_classes=10, seed=0)


def test_cross_entropy_and_argmax_rule():
    out = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1])
    loss = models.loss("cnn")
    assert loss.name == "cross-entropy"
    assert torch.allclose(loss(out, y), torch.nn.functional.cross_entropy(out, y))
    assert models.per_example_loss("resnet")(out, y).shape == (2,)
    assert models.correct("lenet", out, y).tolist() == [True, False]


def test_lenet_follows_dlg():
    m = models.build("lenet", input_shape=IMG, num_classes=10, seed=0)
    assert m.fc.in_features == 12 * 7 * 7  # 28 -> 14 -> 7 -> 7
    m32 = models.build("lenet", input_shape=(3, 32, 32), num_classes=100, seed=0)
    assert m32.fc.in_features == 768  # DLG's Linear(768 -> classes)
    assert all(isinstance(a, torch.nn.Sigmoid) for a in list(m32.body)[1::2])
    for p in m32.parameters():
        assert p.min() >= -0.5 and p.max() <= 0.5
    assert m32(torch.rand(1, 3, 32, 32)).shape == (1, 100)


def test_resnet_counts():
    m = models.build("resnet", input_shape=(3, 32, 32), num_classes=10, seed=0)
    assert models.num_params(m) == 272_474  # resnet20 with projection shortcuts
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # default norm=group
    big = models.build("resnet(depth=32,width=10)", input_shape=(3, 32, 32), num_classes=100, seed=0)
    n = models.num_params(big)
    assert n == 46_429_060 and abs(n - 46.4e6) < 0.1e6  # Inverting Gradients' ResNet32-10: 46.4 M
    bn = models.build("resnet(norm=batch)", input_shape=(3, 32, 32), num_classes=10, seed=0)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in bn.modules())
    assert models.num_params(bn) == 272_474
    nn_ = models.build("resnet(norm=none)", input_shape=(1, 28, 28), num_classes=10, seed=0)
    assert nn_(torch.rand(2, *IMG)).shape == (2, 10)


def test_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = models.build("cnn", input_shape=IMG, num_classes=10, seed=3)
    b = models.build("cnn", input_shape=IMG, num_classes=10, seed=3)
    c = models.build("cnn", input_shape=IMG, num_classes=10, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(models.flat_params(a), models.flat_params(b))
    assert not torch.equal(models.flat_params(a), models.flat_params(c))


def test_normalisation_is_a_buffer_applied_inside():
    m = models.build("cnn", input_shape=IMG, num_classes=10, mean=(0.1307,), std=(0.3081,), seed=0)
    plain = models.build("cnn", input_shape=IMG, num_classes=10, seed=0)
    assert models.num_params(m) == 431_080
    assert {n for n, _ in m.named_buffers()} == {"normalize.mean", "normalize.std"}
    x = torch.rand(3, *IMG)
    assert torch.allclose(m(x), plain((x - 0.1307) / 0.3081), atol=1e-5)
    rgb = models.build("resnet", input_shape=(3, 8, 8), num_classes=10, mean=(0.1, 0.2, 0.3), std=(1, 2, 4), seed=0)
    assert rgb.normalize.mean.shape == (1, 3, 1, 1)


def test_flat_params_roundtrip():
    m = models.build("lenet", input_shape=IMG, num_classes=10, seed=0)
    vec = models.flat_params(m)
    shapes = models.param_shapes(m)
    assert vec.numel() == models.num_params(m)
    back = models.unflatten(vec, shapes)
    for n, p in m.named_parameters():
        assert torch.equal(back[n], p)
    batched = models.unflatten(torch.stack([vec, 2 * vec]), shapes)
    assert torch.equal(batched["fc.bias"][1], 2 * m.fc.bias)
    with pytest.raises(ValueError):
        models.unflatten(vec[:-1], shapes)


def test_check_input():
    models.check_input("cnn", IMG, 10)
    with pytest.raises(ValueError, match="16×16"):
        models.check_input("cnn", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="images"):
        models.check_input("lenet", (68,), 2)


def test_default_hparams():
    hp = models.default_hparams("logit")
    assert (hp["lr"], hp["momentum"], hp["clip"], hp["dampening"]) == (2.0, 0.99, 0.01, 0.0)
    assert models.default_hparams("cnn")["lr"] == 2.0
    assert models.default_hparams("resnet(depth=32,width=10)")["lr"] == 0.1


@pytest.mark.parametrize(
    "name,shape,k",
    [("logit", (68,), 2), ("cnn", IMG, 10), ("lenet", IMG, 10), ("resnet(depth=8)", (3, 8, 8), 10)],
)
def test_vmap_grad_equals_a_loop_of_backward_passes(name, shape, k):
    norm = {"mean": [0.5] * shape[0], "std": [0.25] * shape[0]} if len(shape) == 3 else {}
    m = models.build(name, input_shape=shape, num_classes=k, seed=1, **norm)
    loss = models.loss(name)
    params = {n: p.detach() for n, p in m.named_parameters()}
    g = torch.Generator().manual_seed(0)
    X = torch.rand(3, 4, *shape, generator=g)
    Y = torch.randint(0, k, (3, 4), generator=g)

    def f(p, x, y):
        return loss(functional_call(m, p, (x,)), y)

    batched = vmap(grad(f), in_dims=(None, 0, 0))(params, X, Y)
    for i in range(3):
        m.zero_grad()
        loss(m(X[i]), Y[i]).backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(batched[n][i], p.grad, rtol=1e-4, atol=1e-6)
