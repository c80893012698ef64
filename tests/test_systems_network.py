"""The simulated network of the robust-systems mode: step costs (plain Python) and lossy links.

Expected numbers are computed by hand in the test (formulas written out), never with dpbr's code.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dpbr.simulation.systems.costs import (
    COST_COLUMNS,
    LinkModel,
    StepCost,
    Transfer,
    broadcast,
    exchange,
    gather,
    packet_count,
    round_seconds,
    step_cost,
)
from dpbr.simulation.systems.network import FILLS, transmit

REPO = Path(__file__).resolve().parents[1]
COSTS = REPO / "dpbr" / "simulation" / "systems" / "costs.py"

# The hand-worked example of the brief: n = 11 workers, d = 1000 float32 values, 0.1 ms, 1 MB/s.
SLOW = LinkModel(latency_s=1e-4, bandwidth_bytes_per_s=1e6, compute_s=0.01)


# ---------------------------------------------------------------------------------------------- costs


def test_costs_module_imports_no_torch():
    tree = ast.parse(COSTS.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported and "numpy" not in imported
    # Transitively too: load the file alone (not through dpbr.simulation, whose __init__ imports torch).
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("costs_alone", {str(COSTS)!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules["costs_alone"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        print(mod.round_seconds(mod.gather(11, 1, values=1000), mod.LinkModel()) > 0, "torch" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]


def test_link_defaults_and_values_per_packet():
    link = LinkModel()
    assert (link.latency_s, link.bandwidth_bytes_per_s, link.compute_s, link.bytes_per_value, link.packet_bytes) == (
        1e-4, 1.25e9, 0.0, 4, 1472)
    assert link.values_per_packet == 368  # 1472 / 4
    assert LinkModel(bytes_per_value=8).values_per_packet == 184
    assert LinkModel(packet_bytes=1470).values_per_packet == 367  # a value is never split: 1468 bytes used


@pytest.mark.parametrize(("field", "value"), [
    ("latency_s", -1e-6), ("latency_s", math.nan), ("latency_s", math.inf), ("latency_s", "0.1"),
    ("bandwidth_bytes_per_s", 0.0), ("bandwidth_bytes_per_s", -1.0), ("bandwidth_bytes_per_s", math.inf),
    ("compute_s", -0.5), ("compute_s", math.nan), ("compute_s", True),
    ("bytes_per_value", 0), ("bytes_per_value", 2.0), ("bytes_per_value", True),
    ("packet_bytes", 3), ("packet_bytes", 0), ("packet_bytes", 1472.0),
])
def test_link_refuses_out_of_range_fields(field, value):
    with pytest.raises(ValueError, match=field):
        LinkModel(**{field: value})


def test_link_accepts_boundaries():
    link = LinkModel(latency_s=0, compute_s=0, bytes_per_value=4, packet_bytes=4)
    assert link.values_per_packet == 1


@pytest.mark.parametrize(("values", "link", "expected"), [
    (0, LinkModel(), 0),
    (1, LinkModel(), 1),
    (368, LinkModel(), 1),
    (369, LinkModel(), 2),
    (1000, LinkModel(), 3),  # ceil(4000 / 1472) = ceil(2.72)
    (1000, LinkModel(bytes_per_value=8), 6),  # ceil(8000 / 1472) = ceil(5.43)
    (735, LinkModel(packet_bytes=1470), 3),  # 367 values a packet: 367 + 367 + 1
])
def test_packet_count(values, link, expected):
    assert packet_count(values, link) == expected


def test_gather_round_by_hand():
    t = gather(11, 1, values=1000)
    assert (t.senders, t.receivers, t.messages, t.values_per_message, t.max_in_messages, t.max_out_messages) == (
        11, 1, 11, 1000, 11, 1)
    assert t.bytes(SLOW) == 11 * 1000 * 4
    # latency + 11 messages · 4000 bytes through the server's card at 1e6 B/s
    assert round_seconds(t, SLOW) == pytest.approx(1e-4 + 11 * 4000 / 1e6, rel=1e-12)
    assert round_seconds(t, SLOW) == pytest.approx(0.0441, rel=1e-12)


def test_broadcast_exchange_and_several_servers_by_hand():
    b = broadcast(1, 11, values=1000)
    assert (b.senders, b.receivers, b.messages, b.max_in_messages, b.max_out_messages) == (1, 11, 11, 1, 11)
    assert round_seconds(b, SLOW) == pytest.approx(0.0441, rel=1e-12)
    # 2 servers to 5 workers: a server's card sends 5 messages (out dominates in)
    b2 = broadcast(2, 5, values=1000)
    assert (b2.messages, b2.max_in_messages, b2.max_out_messages) == (10, 2, 5)
    assert round_seconds(b2, SLOW) == pytest.approx(1e-4 + 5 * 4000 / 1e6, rel=1e-12)
    # 11 workers to 3 servers: 33 messages, each server receives 11
    g3 = gather(11, 3, values=1000)
    assert (g3.messages, g3.max_in_messages, g3.max_out_messages) == (33, 11, 3)
    assert g3.bytes(SLOW) == 33 * 4000
    assert round_seconds(g3, SLOW) == pytest.approx(0.0441, rel=1e-12)
    # all-to-all among 4 servers: 12 messages, 3 in and 3 out per server
    e = exchange(4, values=1000)
    assert (e.senders, e.receivers, e.messages, e.max_in_messages, e.max_out_messages) == (4, 4, 12, 3, 3)
    assert round_seconds(e, SLOW) == pytest.approx(1e-4 + 3 * 4000 / 1e6, rel=1e-12)
    # one server exchanges with nobody: an empty round that costs nothing
    e1 = exchange(1, values=1000)
    assert e1.messages == 0 and e1.bytes(SLOW) == 0 and round_seconds(e1, SLOW) == 0.0


def test_parameter_server_step_by_hand():
    rounds = [("servers", broadcast(1, 11, values=1000)), ("workers", gather(11, 1, values=1000))]
    cost = step_cost(1, 11, rounds, SLOW)
    assert isinstance(cost, StepCost)
    assert cost.gradient_computations == 11
    assert cost.messages == 22
    assert cost.bytes_workers == 44_000 and cost.bytes_servers == 44_000
    assert cost.rounds == 2
    # 1 gradient · 0.01 s + 2 · (1e-4 + 0.044) s
    assert cost.step_seconds == pytest.approx(0.01 + 2 * 0.0441, rel=1e-12)
    # each worker computing r = 3 gradients (redundancy): 33 computations, 3 · 0.01 s of compute
    r3 = step_cost(3, 11, rounds, SLOW, server_seconds=0.005)
    assert r3.gradient_computations == 33
    assert r3.step_seconds == pytest.approx(0.03 + 0.0882 + 0.005, rel=1e-12)
    # an empty round is not counted; no rounds at all is compute only
    with_empty = step_cost(1, 11, [*rounds, ("servers", exchange(1, values=1000))], SLOW)
    assert with_empty == cost
    assert step_cost(2, 4, [], SLOW) == StepCost(8, 0, 0, 0, 0, 0.02)


def test_cost_columns_and_row():
    assert COST_COLUMNS == ("gradient_computations", "messages", "bytes_workers", "bytes_servers", "rounds",
                            "step_seconds")
    row = StepCost(1, 2, 3, 4, 5, 6.5).as_row()
    assert list(row) == list(COST_COLUMNS)
    assert list(row.values()) == [1, 2, 3, 4, 5, 6.5]


def test_step_cost_refuses_bad_input():
    with pytest.raises(ValueError, match="workers, servers"):
        step_cost(1, 3, [("clients", gather(3, 1, values=10))], SLOW)
    with pytest.raises(ValueError, match="compute_per_worker"):
        step_cost(-1, 3, [], SLOW)
    with pytest.raises(ValueError, match="workers"):
        step_cost(1, 0, [], SLOW)
    with pytest.raises(ValueError, match="server_seconds"):
        step_cost(1, 3, [], SLOW, server_seconds=math.nan)
    with pytest.raises(ValueError, match="transfers"):
        step_cost(1, 3, [("workers", (3, 1, 3, 10, 3, 1))], SLOW)


@pytest.mark.parametrize("kwargs", [
    dict(senders=0, receivers=1, messages=0, values_per_message=10, max_in_messages=0, max_out_messages=0),
    dict(senders=3, receivers=1, messages=3, values_per_message=0, max_in_messages=3, max_out_messages=1),
    dict(senders=3, receivers=1, messages=3, values_per_message=10, max_in_messages=2, max_out_messages=1),
    dict(senders=3, receivers=1, messages=3, values_per_message=10, max_in_messages=4, max_out_messages=1),
    dict(senders=3, receivers=2, messages=6, values_per_message=10, max_in_messages=3, max_out_messages=1),
    dict(senders=3, receivers=2, messages=-1, values_per_message=10, max_in_messages=0, max_out_messages=0),
    dict(senders=3, receivers=2, messages=0, values_per_message=10, max_in_messages=1, max_out_messages=0),
])
def test_transfer_refuses_inconsistent_counts(kwargs):
    with pytest.raises(ValueError):
        Transfer(**kwargs)


def test_constructors_refuse_no_nodes():
    with pytest.raises(ValueError, match="workers"):
        gather(0, 1, values=10)
    with pytest.raises(ValueError, match="servers"):
        broadcast(0, 3, values=10)
    with pytest.raises(ValueError, match="servers"):
        exchange(0, values=10)
    with pytest.raises(ValueError, match="values_per_message"):
        gather(3, 1, values=0)
    # positional values, as the protocols call them
    assert gather(11, 2, 1000) == gather(11, 2, values=1000) and exchange(3, 7).values_per_message == 7


# -------------------------------------------------------------------------------------------- network

# 10 values a packet (40 bytes / 4): d = 25 → packets [0, 10), [10, 20), [20, 25).
TINY = LinkModel(packet_bytes=40)


def _hand_loss(seed: int, k: int, packets: int, p: float) -> torch.Tensor:
    """The documented draw: a (k, P) float64 uniform tensor from a fresh CPU generator, lost where < p."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((k, packets), generator=g, dtype=torch.float64) < p


def _hand_fill(x: torch.Tensor, lost: torch.Tensor, q: int, value: float) -> torch.Tensor:
    """Loops on purpose (a reference): packet j of message i covers coordinates j·q … min((j+1)·q, d) − 1."""
    out = x.clone()
    d = x.shape[1]
    for i in range(lost.shape[0]):
        for j in range(lost.shape[1]):
            if lost[i, j]:
                out[i, j * q:min((j + 1) * q, d)] = value
    return out


def test_drop_zero_returns_input_values_and_draws_nothing():
    x = torch.randn(5, 1000)
    g = torch.Generator().manual_seed(3)
    state = g.get_state().clone()
    for fill in FILLS:
        out = transmit(x, 0.0, fill=fill, generator=g)
        assert torch.equal(out.values, x)
        assert out.values.data_ptr() != x.data_ptr()  # a copy: the caller may change it freely
        assert out.delivered.all() and out.delivered.shape == (5,) and out.delivered.dtype == torch.bool
        assert torch.equal(out.packets_lost, torch.zeros(5, dtype=torch.int64))
        assert out.packets == 3 and out.lost_mask.shape == (5, 3) and not out.lost_mask.any()
    assert torch.equal(g.get_state(), state)
    assert torch.equal(transmit(x, 0, generator=None).values, x)  # no generator needed without losses


def test_drop_one_loses_everything():
    x = torch.randn(4, 25)
    zero = transmit(x, 1.0, link=TINY, fill="zero", generator=torch.Generator().manual_seed(0))
    assert torch.equal(zero.values, torch.zeros(4, 25))
    assert torch.equal(zero.packets_lost, torch.full((4,), 3, dtype=torch.int64)) and zero.lost_mask.all()
    assert zero.delivered.all()
    nan = transmit(x, 1.0, link=TINY, fill="nan", generator=torch.Generator().manual_seed(0))
    assert torch.isnan(nan.values).all() and nan.delivered.all()
    lost = transmit(x, 1.0, link=TINY, fill="lost", generator=torch.Generator().manual_seed(0))
    assert torch.isnan(lost.values).all() and not lost.delivered.any()


def test_same_seed_same_losses_in_every_fill_mode():
    x = torch.randn(50, 25)
    masks = [transmit(x, 0.5, link=TINY, fill=fill, generator=torch.Generator().manual_seed(7)).lost_mask
             for fill in FILLS]
    assert all(torch.equal(m, masks[0]) for m in masks)
    a = transmit(x, 0.5, link=TINY, fill="zero", generator=torch.Generator().manual_seed(7))
    b = transmit(x, 0.5, link=TINY, fill="zero", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.values, b.values) and torch.equal(a.packets_lost, b.packets_lost)
    c = transmit(x, 0.5, link=TINY, fill="zero", generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a.lost_mask, c.lost_mask)  # 150 fair coins: equal with probability 2^-150


def test_loss_fraction_matches_drop_probability():
    # N = 400 messages · 50 full packets = 20,000 packets; p = 0.1: tolerance 4·sqrt(p(1-p)/N) ≈ 0.0085
    k, packets, p = 400, 50, 0.1
    x = torch.ones(k, 368 * packets)
    out = transmit(x, p, fill="zero", generator=torch.Generator().manual_seed(2024))
    n = k * packets
    fraction = out.packets_lost.sum().item() / n
    assert abs(fraction - p) <= 4 * math.sqrt(p * (1 - p) / n)
    # every packet is full here, so the fraction of zeroed coordinates is exactly the packet fraction
    assert (out.values == 0).sum().item() == 368 * out.packets_lost.sum().item()


def test_lost_packets_zero_exactly_their_contiguous_range():
    k, d, p, seed = 30, 25, 0.3, 11
    x = torch.randn(k, d, dtype=torch.float64)
    lost = _hand_loss(seed, k, 3, p)
    assert lost.any() and not lost.all()
    out = transmit(x, p, link=TINY, fill="zero", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out.lost_mask, lost)
    assert torch.equal(out.packets_lost, lost.sum(dim=1))
    assert torch.equal(out.values, _hand_fill(x, lost, 10, 0.0))
    nan = transmit(x, p, link=TINY, fill="nan", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(torch.isnan(nan.values), torch.isnan(_hand_fill(x, lost, 10, math.nan)))
    assert torch.equal(nan.values.nan_to_num(7.0), _hand_fill(x, lost, 10, 7.0))


def test_default_packets_hold_368_float32_values():
    # d = 737 = 368 + 368 + 1: the last packet holds one coordinate
    x = torch.ones(200, 737)
    out = transmit(x, 0.5, fill="zero", generator=torch.Generator().manual_seed(5))
    assert out.packets == 3
    zeroed = out.values == 0
    for start, stop in ((0, 368), (368, 736), (736, 737)):
        block = zeroed[:, start:stop]
        # each packet is lost as a whole: all of its coordinates or none
        assert torch.equal(block.all(dim=1), block.any(dim=1))
    assert torch.equal(zeroed[:, [0, 368, 736]], out.lost_mask)


def test_lost_mode_drops_whole_messages():
    k, d, p, seed = 40, 25, 0.2, 13
    x = torch.randn(k, d)
    lost = _hand_loss(seed, k, 3, p)
    hit = lost.any(dim=1)
    assert hit.any() and not hit.all()
    out = transmit(x, p, link=TINY, fill="lost", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out.delivered, ~hit)
    assert torch.equal(out.packets_lost, lost.sum(dim=1))
    assert torch.isnan(out.values[hit]).all()
    assert torch.equal(out.values[~hit], x[~hit])


@pytest.mark.parametrize("fill", FILLS)
def test_input_is_not_mutated(fill):
    x = torch.randn(20, 25)
    before = x.clone()
    transmit(x, 0.5, link=TINY, fill=fill, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    x = torch.randn(10, 25).to(dtype)
    lost = _hand_loss(4, 10, 3, 0.4)
    out = transmit(x, 0.4, link=TINY, fill="zero", generator=torch.Generator().manual_seed(4))
    assert out.values.dtype == dtype and out.values.device == x.device
    assert torch.equal(out.values, _hand_fill(x, lost, 10, 0.0))


def test_empty_shapes():
    out = transmit(torch.zeros(0, 25), 0.5, link=TINY, generator=torch.Generator().manual_seed(0))
    assert out.values.shape == (0, 25) and out.packets_lost.shape == (0,)
    out = transmit(torch.zeros(3, 0), 0.5, generator=torch.Generator().manual_seed(0))
    assert out.packets == 0 and out.values.shape == (3, 0) and out.delivered.all()


@pytest.mark.parametrize("drop", [-0.1, 1.1, math.nan, math.inf, True, "0.1"])
def test_refuses_drop_outside_unit_interval(drop):
    with pytest.raises(ValueError, match="drop"):
        transmit(torch.zeros(2, 5), drop, generator=torch.Generator().manual_seed(0))


def test_refuses_unknown_fill_bad_tensors_and_missing_generator():
    with pytest.raises(ValueError, match="zero, nan, lost"):
        transmit(torch.zeros(2, 5), 0.1, fill="zeros", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="2-D"):
        transmit(torch.zeros(5), 0.1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="floating"):
        transmit(torch.zeros(2, 5, dtype=torch.int64), 0.1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="generator"):
        transmit(torch.zeros(2, 5), 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_cuda_vectors(gen_device):
    x = torch.randn(30, 25, device="cuda")
    g = torch.Generator(device=gen_device).manual_seed(9)
    out = transmit(x, 0.3, link=TINY, fill="zero", generator=g)
    assert out.values.device == x.device and out.delivered.device == x.device
    assert out.packets_lost.device == x.device and out.lost_mask.device == x.device
    g2 = torch.Generator(device=gen_device).manual_seed(9)
    lost = (torch.rand((30, 3), generator=g2, device=gen_device, dtype=torch.float64) < 0.3).cpu()
    assert torch.equal(out.lost_mask.cpu(), lost)
    assert torch.equal(out.values.cpu(), _hand_fill(x.cpu(), lost, 10, 0.0))
