"""Bit flip as Karimireddy, He & Jaggi define it (arXiv 2006.09365), next to sign flip."""

from __future__ import annotations

import pytest
import torch

from dpbr.errors import UsageError
from dpbr.robust import attacks

H = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 5.0, -1.0]])


def test_known_answer_bit_flip_negates_each_workers_own_gradient():
    own = torch.tensor([[0.5, -1.0, 2.0], [4.0, 0.0, -3.0]], dtype=torch.float64)
    atk = attacks.get("bit-flip")
    out = atk(H, 2, own=own)
    expected = torch.tensor([[-0.5, 1.0, -2.0], [-4.0, 0.0, 3.0]])  # row j = −own_j, in H's dtype
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(own, torch.tensor([[0.5, -1.0, 2.0], [4.0, 0.0, -3.0]], dtype=torch.float64))  # not modified
    forged = atk.forge(H, 2, own=own)
    assert not forged.copies and forged.state is None
    # independent of the honest vectors (unlike sign flip)
    torch.testing.assert_close(atk(10 * H + 1, 2, own=own), expected, rtol=0, atol=0)


def test_sign_flip_is_the_negated_honest_mean_not_bit_flip():
    out = attacks.get("sign-flip")(H, 2)
    mean = torch.tensor([2.0, 3.0, 1.0])  # (1/3) Σ rows of H
    torch.testing.assert_close(out, torch.stack([-mean, -mean]), rtol=0, atol=1e-6)
    assert not attacks.get("sign-flip").needs_own_gradients


def test_bit_flip_computes_on_true_labels_and_names():
    atk = attacks.get("BitFlip")
    assert atk.name == "bit-flip" and attacks.get("bit_flip").name == "bit-flip"
    assert atk.needs_own_gradients and not atk.needs_generator and not atk.needs_aggregator
    y = torch.tensor([0, 3, 9, 9])
    mapped = atk.label_map(y, 10)
    assert torch.equal(mapped, y) and mapped.data_ptr() != y.data_ptr()


def test_bit_flip_errors_and_batch():
    atk = attacks.get("bit-flip")
    with pytest.raises(UsageError, match="--attack.*own"):
        atk(H, 2)
    with pytest.raises(UsageError, match=r"shape \(2, 3\)"):
        atk(H, 2, own=torch.zeros(3, 3))
    assert atk(H, 0).shape == (0, 3)
    own = torch.arange(12.0).reshape(2, 2, 3)
    Hs = torch.stack([H, 2 * H])
    torch.testing.assert_close(atk(Hs, 2, own=own), -own, rtol=0, atol=0)
