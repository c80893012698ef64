"""The robust systems as runs (:mod:`dpbr.simulation.systems`): DRACO's exact recovery, its vote under
per-worker noise, GuanYu and LiuBei with replicated servers, lossy links, staleness, the cost
counters on hand-computed steps, and every requirement as a one-line error.

References are other runs whose behaviour is known independently (the one-server engine, the
adversary-free run) or numbers computed by hand in the test — never the system code's own output.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpbr.data import load
from dpbr.simulation import Simulation
from dpbr.simulation.systems.run import SYSTEM_COLUMNS, SystemSimulation
from dpbr.spec import RunSpec
from tests.test_bad_input import TRAIN, assert_one_line_error

VECTORS = "synthetic(classes=2,d=68,n=512,n_test=128)"
CPU = torch.device("cpu")
BASE = dict(dataset=VECTORS, model="logit", workers=9, byzantine=1, batch_size=16, steps=40, eval_every=20,
            lr=0.5, momentum=0.9)


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    return load(VECTORS, tmp_path_factory.mktemp("data"), device=CPU)


def run(dataset, **options):
    spec = RunSpec.create(**{**BASE, **options})
    sim = (Simulation if spec.plain_server else SystemSimulation)(spec, dataset, CPU)
    return sim, sim.run()


def column(result, name: str) -> torch.Tensor:
    return result.columns[name]


# -- the one server on a lossless link, and what the loss does ---------------------------------------- #

@pytest.mark.parametrize("options", [
    dict(gar="krum", attack="little"),
    dict(gar="median", attack="sign-flip", epsilon=0.5, clip=1.0),
    dict(gar="centered-clipping", attack="empire"),
])
def test_lossy_link_with_no_loss_is_the_one_server_run(vectors, options):
    """drop = 0: the system loop (one step at a time) gives the engine's trajectory bit for bit."""
    engine, expected = run(vectors, **options)
    system, got = run(vectors, network="lossy(drop=0)", **options)
    assert torch.equal(system.oracle.theta, engine.oracle.theta)
    assert got.evaluations == expected.evaluations
    torch.testing.assert_close(got.metrics, expected.metrics, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert bool((column(got, "packets_lost") == 0).all())


def test_lost_packets_become_nans_zeros_or_lost_messages(vectors):
    """d = 69 values fit one packet: every message is one packet, lost with probability drop."""
    _, zeros = run(vectors, gar="median", attack="sign-flip", network="lossy(drop=0.2,fill=zeros)", steps=200,
                   eval_every=0)
    lost = column(zeros, "packets_lost")
    # 9 packets a step, 200 steps: share lost within 4 standard errors of 0.2
    assert abs(float(lost.mean()) - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 1800)
    assert zeros.status == "completed"
    _, nans = run(vectors, gar="average", network="lossy(drop=0.2,fill=nans)", steps=60, eval_every=0)
    assert nans.status == "diverged"  # the average of a NaN row is NaN: averaging does not absorb NaNs
    _, whole = run(vectors, gar="median", network="lossy(drop=0.5,fill=lost)", steps=60, eval_every=0)
    msgs = column(whole, "messages_lost")
    assert float(msgs.mean()) == pytest.approx(4.5, abs=4 * math.sqrt(9 * 0.25 * 60) / 60 + 0.6)
    # a median over the delivered rows needs n >= 2f + 1 = 3 of them; steps with fewer apply no update
    applied = column(whole, "update_applied")
    assert set(applied.tolist()) <= {0.0, 1.0}


def test_staleness_draws_ages_in_range_and_changes_the_run(vectors):
    _, fresh = run(vectors, gar="krum", steps=120, eval_every=0)
    sim, stale = run(vectors, gar="krum", staleness=3, steps=120, eval_every=0)
    ages = column(stale, "staleness_mean")
    assert float(ages.min()) >= 0 and float(ages.max()) <= 3
    # from step 4 on ages are uniform on 0..3: mean 1.5, per-step mean of 8 workers' ages (sd 1.118/sqrt(8))
    assert abs(float(ages[3:].mean()) - 1.5) < 4 * 1.118 / math.sqrt(8 * 117)
    assert float(ages[0]) == 0  # no older model exists at the first step
    assert not torch.equal(stale.metrics, fresh.metrics)


# -- DRACO --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("code", ["repetition", "cyclic"])
@pytest.mark.parametrize("attack", ["sign-flip", "little", "nan", "inf", "gaussian"])
def test_draco_recovers_the_adversary_free_run(vectors, code, attack):
    """r = 2s + 1: any attack of s workers leaves the trained model the adversary-free one (repetition:
    bit for bit; cyclic: to float32 rounding of the decoding)."""
    system = f"draco(r=3,code={code})"
    clean_sim, clean = run(vectors, system=system)
    sim, attacked = run(vectors, system=system, attack=attack)
    assert bool((column(attacked, "decoded_fraction") == 1).all())
    if code == "repetition":
        assert torch.equal(sim.oracle.theta, clean_sim.oracle.theta)
        assert attacked.evaluations == clean.evaluations
    else:
        torch.testing.assert_close(sim.oracle.theta, clean_sim.oracle.theta, rtol=1e-4, atol=1e-6)
    assert bool((column(attacked, "located_byzantine") == 1).all())


def test_draco_with_two_byzantine_and_r5(vectors):
    clean_sim, _ = run(vectors, system="draco(r=5)", workers=10, byzantine=2)
    sim, _ = run(vectors, system="draco(r=5)", workers=10, byzantine=2, attack="sign-flip")
    assert torch.equal(sim.oracle.theta, clean_sim.oracle.theta)


def test_draco_breaks_beyond_its_redundancy(vectors):
    """Two Byzantine workers of one r = 3 group send equal vectors and win its vote (a test that bites)."""
    clean_sim, _ = run(vectors, system="draco(r=3)")
    sim, attacked = run(vectors, system="draco(r=3)", attack="sign-flip", byzantine_real=2)
    assert not torch.equal(sim.oracle.theta, clean_sim.oracle.theta)


def test_draco_vote_fails_under_per_worker_noise(vectors):
    """Gaussian noise drawn by each worker makes the replicas differ: the exact vote decodes nothing and
    the model never moves; a tolerance vote with a tolerance above the noise's spread decodes again."""
    sim, noisy = run(vectors, system="draco(r=3)", epsilon=0.5, clip=1.0, attack="sign-flip")
    assert bool((column(noisy, "decoded_fraction") == 0).all())
    assert bool((column(noisy, "update_applied") == 0).all())
    assert torch.equal(sim.oracle.theta, sim.theta0)
    sigma = sim.noise_sigma
    tol = 2 * sigma * math.sqrt(2 * sim.dim)  # pairwise distance of two noise draws ≈ σ√(2d), with margin
    sim2, tolerant = run(vectors, system=f"draco(r=3,vote=tolerance,tol={tol})", epsilon=0.5, clip=1.0,
                         attack="sign-flip")
    assert float(column(tolerant, "decoded_fraction").mean()) > 0.95
    assert not torch.equal(sim2.oracle.theta, sim2.theta0)


def test_draco_costs_r_gradients_per_worker(vectors):
    _, result = run(vectors, system="draco(r=3)")
    assert bool((column(result, "gradient_computations") == 27).all())


# -- replicated servers ---------------------------------------------------------------------------------- #

@pytest.mark.parametrize("gar", ["krum", "median", "average"])
def test_guanyu_without_byzantine_servers_and_full_quorums_is_the_one_server_run(vectors, gar):
    engine, expected = run(vectors, gar=gar, attack="little")
    sim, got = run(vectors, gar=gar, attack="little", system="guanyu(m=3,byzantine=0,q=9)")
    torch.testing.assert_close(sim.oracle.theta, engine.oracle.theta, rtol=1e-6, atol=1e-7)
    assert bool((column(got, "server_spread") == 0).all())


@pytest.mark.parametrize("server_attack", ["random", "negate", "equivocate", "silent"])
def test_guanyu_tolerates_a_byzantine_server(vectors, server_attack):
    engine, expected = run(vectors, gar="multi-krum", attack="little", steps=100)
    sim, got = run(vectors, gar="multi-krum", attack="little", steps=100,
                   system=f"guanyu(m=6,byzantine=1,attack={server_attack})")
    assert got.status == "completed"
    # the medians of quorums keep the honest servers together and near the one-server run
    assert float(column(got, "server_spread").max()) < 0.1 * float(sim.oracle.theta.norm())
    assert got.evaluations[100][0] >= expected.evaluations[100][0] - 0.1


def test_server_median_and_byzantine_models_by_hand():
    """The worker's median of a quorum (numpy's median as reference) stays within the honest models'
    coordinate range when fewer than half the replies are Byzantine; the attacks' shapes and values."""
    import numpy as np

    from dpbr.simulation.systems.servers import byzantine_models, coordinate_median

    gen = torch.Generator().manual_seed(3)
    honest = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    byz = byzantine_models(honest, 1, 2, "random", gen)
    assert byz.shape == (2, 1, 50) and torch.equal(byz[0], byz[1])  # the same model to every recipient
    # σ = 10·max(‖θ̄‖, 1)/√d, so ‖σξ‖ ≈ 10·‖θ̄‖ (chi distribution with 50 degrees: within ±30 %)
    scale = max(float(honest.mean(0).norm()), 1.0)
    assert 7 * scale < float((byz[0, 0] - honest.mean(0)).norm()) < 13 * scale
    eq = byzantine_models(honest, 2, 3, "equivocate", gen)
    assert eq.shape == (3, 2, 50) and not torch.equal(eq[0], eq[1])
    assert torch.equal(byzantine_models(honest, 1, 2, "negate", gen)[1, 0], -honest.mean(0))
    assert byzantine_models(honest, 1, 2, "silent", gen) is None
    stack = torch.cat([honest, byz[0]])
    got = coordinate_median(stack)
    np.testing.assert_allclose(got.numpy(), np.median(stack.numpy(), axis=0), rtol=0, atol=1e-15)
    assert bool(((got >= honest.min(0).values) & (got <= honest.max(0).values)).all())


@pytest.mark.parametrize("server_attack", ["random", "negate", "equivocate"])
def test_liubei_filters_reject_byzantine_models(vectors, server_attack):
    sim, got = run(vectors, gar="multi-krum", attack="little", steps=100, momentum=0.0, lr=0.5,
                   system=f"liubei(m=4,byzantine=1,attack={server_attack})")
    assert got.status == "completed"
    # every step 2 of the 8 workers start at the Byzantine server (round robin) and reject its model
    assert bool((column(got, "models_rejected") >= 2).all())
    # every honest worker computes on an honest server's model (or the median of all), never on the
    # Byzantine one: the honest servers agree here, so the workers' models equal the first server's
    assert float(column(got, "worker_model_spread").max()) < 1e-6
    losses = got.metrics[:, 0]
    assert float(losses[-20:].mean()) < float(losses[:5].mean())


def test_liubei_without_the_model_filter_state_accepts_anything_at_first(vectors):
    """At the first step only the common initial model passes (no gradient yet): a silent Byzantine
    server costs nothing, and with no Byzantine server no pull is rejected at step 0."""
    _, got = run(vectors, gar="multi-krum", steps=5, momentum=0.0, system="liubei(m=4,byzantine=0)")
    assert float(column(got, "models_rejected")[0]) == 0
    _, silent = run(vectors, gar="multi-krum", steps=5, momentum=0.0, system="liubei(m=4,byzantine=1,attack=silent)")
    assert float(column(silent, "models_rejected")[0]) == 0


def test_liubei_without_byzantine_servers_is_cheaper_than_guanyu(vectors):
    _, liubei = run(vectors, gar="multi-krum", system="liubei(m=4,byzantine=0)", momentum=0.0, steps=30)
    _, guanyu = run(vectors, gar="multi-krum", system="guanyu(m=4,byzantine=0)", momentum=0.0, steps=30)
    assert float(column(liubei, "messages").mean()) < float(column(guanyu, "messages").mean())


# -- cost counters on hand-computed steps ------------------------------------------------------------------ #

def test_costs_of_one_server_step_by_hand(vectors, tmp_path):
    """n = 9, d = 69 (68 features + bias), float32: each direction 9 messages of 276 bytes; two rounds of
    latency 1e-4 s + 9·276 B / 1.25e9 B/s."""
    from dpbr.jobs.train import train

    spec = RunSpec.create(**{**BASE, "steps": 3, "eval_every": 0})
    frame = pd.read_parquet(train(spec, out=tmp_path / "plain.parquet", data_dir=tmp_path))
    row = frame.iloc[1]
    assert row.gradient_computations == 9 and row.messages == 18 and row.rounds == 2
    assert row.bytes_workers == 9 * 69 * 4 and row.bytes_servers == 9 * 69 * 4
    assert row.step_seconds == pytest.approx(2 * (1e-4 + 9 * 276 / 1.25e9), rel=1e-12)


def test_costs_of_guanyu_step_by_hand(vectors):
    """m = 3 servers, n = 9: models to workers 27 messages, gradients to servers 27, server exchange 6;
    three rounds; the busiest NIC per round: a server sending 9 models, a server receiving 9 gradients,
    a server sending and receiving 2 models."""
    _, got = run(vectors, system="guanyu(m=3,byzantine=0)", gar="median", steps=2, network="ideal(compute=0.01)")
    assert float(column(got, "messages")[0]) == 27 + 27 + 6
    assert float(column(got, "rounds")[0]) == 3
    assert float(column(got, "bytes_servers")[0]) == (27 + 6) * 276
    assert float(column(got, "bytes_workers")[0]) == 27 * 276
    expected = 0.01 + 3 * 1e-4 + (9 + 9 + 2) * 276 / 1.25e9
    assert float(column(got, "step_seconds")[0]) == pytest.approx(expected, rel=1e-12)


def test_every_system_run_records_its_columns(vectors, tmp_path):
    from dpbr.jobs.train import train

    spec = RunSpec.create(**{**BASE, "steps": 3, "eval_every": 0, "system": "draco(r=3)", "attack": "sign-flip"})
    frame = pd.read_parquet(train(spec, out=tmp_path / "draco.parquet", data_dir=tmp_path))
    for name in SYSTEM_COLUMNS + ("gradient_computations", "messages", "step_seconds", "seconds_step"):
        assert name in frame.columns, name
    assert frame.system.iloc[0] == "draco(code=repetition,r=3,tol=0,vote=exact)"


# -- ids and requirements -------------------------------------------------------------------------------- #

def test_default_system_keeps_the_one_server_cell_ids():
    spec = RunSpec.create(dataset="phishing", model="logit", steps=5)
    assert spec.cell_id() == ("dataset=phishing,model=logit/gar=average,attack=none/epsilon=none,delta=1e-06,"
                              "clip=0.01,clip_mode=batch,sparsify=none,quantize=none/batch_size=50,workers=11,"
                              "byzantine=5,byzantine_real=0,steps=5,lr=2,momentum=0.99,eval_every=50,"
                              "partition=iid,worker_momentum=0/seed=1")
    same = RunSpec.create(dataset="phishing", model="logit", steps=5, network="ideal(latency=0.0001)")
    assert same.cell_id() == spec.cell_id()
    other = RunSpec.create(dataset="phishing", model="logit", steps=5, network="ideal(latency=0.01)")
    assert "network=ideal_latency=0.01" in other.cell_id()


@pytest.mark.parametrize("extra, option, says", [
    (["--system", "draco(r=2)", "--byzantine", "1", "--workers", "4"], "--system", "r >= 2f + 1 = 3"),
    (["--system", "draco(r=3)", "--byzantine", "1", "--workers", "4"], "--system", "r to divide n = 4"),
    (["--system", "draco(r=5,code=cyclic)", "--byzantine", "1", "--workers", "4"], "--system", "r <= n = 4"),
    (["--system", "draco(r=3)", "--byzantine", "1", "--workers", "9", "--gar", "krum"], "--gar", "use --gar average"),
    (["--system", "guanyu(m=5,byzantine=1)", "--workers", "9", "--byzantine", "1"], "--system", "m >= 3·byzantine + 3 = 6"),
    (["--system", "guanyu(m=6,byzantine=1,q=4)", "--workers", "9", "--byzantine", "1"], "--system", "in 5 .. 9"),
    (["--system", "guanyu(m=6,byzantine=1,qbar=6)", "--workers", "9", "--byzantine", "1"], "--system", "in 5 .. 5"),
    (["--system", "liubei(m=3,byzantine=1)", "--workers", "9", "--byzantine", "1"], "--system", "m >= 3·byzantine + 1 = 4"),
    (["--system", "liubei(m=4,attack=loud)"], "--system", "random, negate, equivocate, silent"),
    (["--system", "raft"], "--system", "allowed: server, draco, guanyu, liubei"),
    (["--system", "draco(s=1)"], "--system", "no parameter 's'"),
    (["--system", "draco(r=3,vote=tolerance)", "--workers", "3", "--byzantine", "1"], "--system", "needs tol > 0"),
    (["--network", "lossy(drop=1)"], "--network", "must be < 1"),
    (["--network", "lossy(drop=-0.1)"], "--network", ">= 0.0"),
    (["--network", "lossy(fill=maybe)"], "--network", "nans, zeros, lost"),
    (["--network", "ideal(bandwidth=0)"], "--network", "> 0.0"),
    (["--network", "ideal(drop=0.1)"], "--network", "no parameter 'drop'"),
    (["--staleness", "-1"], "--staleness", ">= 0"),
    (["--staleness", "2", "--system", "draco(r=3)", "--workers", "3", "--byzantine", "1"], "--staleness", "server or guanyu"),
    (["--system", "liubei(m=4,byzantine=1)", "--worker-momentum", "0.9"], "--worker-momentum", "must be 0"),
])
def test_every_violated_requirement_is_one_line(extra, option, says, capsys, tmp_path):
    out = tmp_path / "never.parquet"
    assert_one_line_error([*TRAIN, *extra, "--out", out], option, capsys, says=says)
    assert not out.exists()


# -- the study's configurations ------------------------------------------------------------------------ #

@pytest.mark.parametrize("name, count, seeds", [("systems-quick", 46, {1}), ("systems", 222, {1, 2, 3})])
def test_systems_configs_hold_every_claims_cells(name, count, seeds):
    """Each claim of the README's "Robust systems" section has its cells: DRACO under attacks and without,
    both codes, with noise (exact and tolerance vote); GuanYu and LiuBei with a Byzantine server under each
    behaviour; the one-server baselines; lossy links (zeros, NaNs, lost messages); malformed input;
    staleness — and no cell of the default system (its ids would lack the system level)."""
    import yaml

    from dpbr.report import grid
    from dpbr.spec import default_system

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / f"{name}.yaml").read_text())
    cells = list(grid.expand(config["train"], RunSpec, "train").values())
    assert len(cells) == count
    assert {c.seed for c in cells} == seeds
    assert not any(default_system(c) for c in cells)
    systems = {c.system.split("(")[0] for c in cells}
    assert systems == {"server", "draco", "guanyu", "liubei"}
    draco = [c for c in cells if c.system.startswith("draco")]
    assert {("cyclic" in c.system, c.attack == "none") for c in draco} == {(a, b) for a in (0, 1) for b in (0, 1)}
    assert any(c.epsilon is not None and "vote=exact" in c.system for c in draco)
    assert any(c.epsilon is not None and "vote=tolerance" in c.system for c in draco)
    for attack in ("random", "negate", "equivocate"):
        assert any(f"attack={attack}" in c.system and "byzantine=1" in c.system for c in cells if "guanyu" in c.system)
        assert any(f"attack={attack}" in c.system and "byzantine=1" in c.system for c in cells if "liubei" in c.system)
    from dpbr.system_catalog import parse_network

    fills = {parse_network(c.network).fill for c in cells if c.network.startswith("lossy")}
    assert fills == {"zeros", "nans", "lost"}
    assert {c.staleness for c in cells} >= {0, 2, 8}
    assert any(c.attack == "nan" and c.system == "server" for c in cells)


def test_silent_byzantine_servers_send_nothing(vectors):
    """m = 6, one silent: 5 servers send models to 9 workers (45), 9 workers send to 6 servers (54),
    5 servers send to the 5 others (25); the busiest node per round as in the loud case."""
    _, loud = run(vectors, system="guanyu(m=6,byzantine=1,attack=random)", gar="median", steps=2)
    _, silent = run(vectors, system="guanyu(m=6,byzantine=1,attack=silent)", gar="median", steps=2)
    assert float(column(loud, "messages")[0]) == 54 + 54 + 30
    assert float(column(silent, "messages")[0]) == 45 + 54 + 25
    assert float(column(silent, "bytes_servers")[0]) == (45 + 25) * 276


def test_guanyu_with_stale_workers_and_no_byzantine_server_is_the_stale_one_server_run(vectors):
    """f̄ = 0, full quorums: every server holds the one server's model, so a worker's median of the servers'
    models of τ_j steps ago is the one server's model of τ_j steps ago (the same age draws)."""
    engine, expected = run(vectors, gar="krum", attack="little", staleness=3, steps=60)
    sim, got = run(vectors, gar="krum", attack="little", staleness=3, steps=60, system="guanyu(m=3,byzantine=0,q=9)")
    torch.testing.assert_close(column(got, "staleness_mean"), column(expected, "staleness_mean"), rtol=0, atol=0)
    torch.testing.assert_close(sim.oracle.theta, engine.oracle.theta, rtol=1e-5, atol=1e-7)
    _, loud = run(vectors, gar="krum", attack="little", staleness=3, steps=60, system="guanyu(m=6,byzantine=1)")
    assert loud.status == "completed" and float(column(loud, "staleness_mean")[3:].mean()) > 1


def test_draco_anchored_to_the_one_server_average(vectors):
    """Independent anchors for DRACO's update (not DRACO against DRACO): with r = 1 every worker is its own
    group, so the vote returns each worker's gradient and the update is the one-server average (bit for
    bit); the cyclic code decodes Σ_k g_k over the n tasks drawn by the n workers' generators, so without
    attack its update is the one-server average of n honest workers (to float32 decoding rounding)."""
    engine, expected = run(vectors, gar="average", byzantine=0)
    sim, got = run(vectors, system="draco(r=1)", byzantine=0)
    assert torch.equal(sim.oracle.theta, engine.oracle.theta)
    assert got.evaluations == expected.evaluations
    engine9, _ = run(vectors, gar="average")
    cyclic, _ = run(vectors, system="draco(r=3,code=cyclic)")
    torch.testing.assert_close(cyclic.oracle.theta, engine9.oracle.theta, rtol=1e-4, atol=1e-6)


def test_quorums_are_filled_adversarially(vectors):
    """A server's quorum of q gradients holds every delivered Byzantine message, then honest ones: with
    q = 5 of n = 9 (the last row Byzantine) the average of the quorum is (byz + 4 honest rows)/5."""
    spec = RunSpec.create(**{**BASE, "gar": "average", "attack": "little", "system": "guanyu(m=3,byzantine=0,q=5)"})
    sim = SystemSimulation(spec, vectors, CPU)
    received = torch.zeros(9, sim.dim)
    received[:8, 0] = 1.0           # honest rows: 1 in coordinate 0
    received[8, 1] = 1000.0         # the Byzantine row
    delivered = torch.ones(9, dtype=torch.bool)
    agg, applied = sim.protocol.aggregate_at(0, received, delivered, 5)
    assert applied
    assert float(agg.value[1]) == pytest.approx(200.0) and float(agg.value[0]) == pytest.approx(0.8)
    lost_byz = delivered.clone()
    lost_byz[8] = False             # a lost Byzantine message leaves room for one more honest row
    agg, _ = sim.protocol.aggregate_at(0, received, lost_byz, 5)
    assert float(agg.value[1]) == 0 and float(agg.value[0]) == pytest.approx(1.0)
