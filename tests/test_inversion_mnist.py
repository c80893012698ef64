"""Gradient inversion on real MNIST (slow: needs the MNIST cache, fetched on first use; run with -m slow).

The data folder is ``$DPBR_DATA_DIR`` or ``data/`` at the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpbr.spec import ReconSpec

pytestmark = pytest.mark.slow

DATA_DIR = Path(os.environ.get("DPBR_DATA_DIR", Path(__file__).resolve().parent.parent / "data"))


@pytest.fixture(scope="module")
def mnist():
    from dpbr import data

    return data.load("mnist", DATA_DIR)


@pytest.mark.parametrize("strategy,evaluation", [("auto", "analytic"), ("loop", "loop")])
def test_dlg_on_lenet_recovers_one_mnist_training_image_within_300_lbfgs_steps(tmp_path, mnist, strategy, evaluation):
    """REFERENCE §6 / issue 6: DLG (L-BFGS, soft label, squared gradient distance) on DLG's LeNet,
    one MNIST training image, on the CPU: MSE < 1e-3 on [0, 1] pixels and the right label — with the
    default (hand-derived) objective and with autograd's."""
    from dpbr.jobs.reconstruct import reconstruct
    from dpbr.io import read_metadata

    spec = ReconSpec.create(attack="dlg", model="lenet", dataset="mnist", batch_size=1, iterations=300, seed=1)
    out, png = reconstruct(spec, out=tmp_path / "dlg.parquet", data_dir=DATA_DIR, device="cpu", strategy=strategy)
    assert read_metadata(out)["evaluation"] == evaluation
    row = pd.read_parquet(out).iloc[0]
    assert row["status"] == "ok"
    assert row["mse"] < 1e-3 and bool(row["success_1e-3"])
    assert bool(row["label_correct"]) and row["label_pred"] == row["label"]
    assert row["iterations_run"] <= 300
    assert row["ssim"] > 0.99 and row["psnr"] > 30
    assert png.exists()


def test_idlg_label_rule_is_exact_on_mnist_with_lenet(mnist):
    """iDLG's claim (100 % label accuracy for one image with non-negative features), on 40 images."""
    from dpbr import models, rng
    from dpbr.inversion.objective import infer_labels, last_layer_weight

    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(mnist.train_size, generator=g)[:40]
    loss = models.loss("lenet")
    hits = 0
    for i, k in enumerate(idx):
        model = models.build("lenet", input_shape=mnist.input_shape, num_classes=10, mean=mnist.mean, std=mnist.std,
                             seed=rng.derive_seed(i, "model"))
        x, y = mnist.x_train[k:k + 1], mnist.y_train[k:k + 1]
        grads = torch.autograd.grad(loss(model(x), y), list(model.parameters()))
        hits += int(infer_labels(grads[last_layer_weight(model, 10)], 1)[0] == y[0])
    assert hits == 40
