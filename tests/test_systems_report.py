"""dpbr systems-report: the robust systems' table, every verdict rule of the claims table and the figures, on
hand-made summaries whose expected numbers are computed here by hand or with plain pandas."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dpbr.cli import main
from dpbr.io import write_parquet
from dpbr.report.systems_report import (CAVEAT, FAILS, FIGURES, HOLDS, MISSING, SUMMARY_FILES, applies,
                                        claims_markdown, system_label, systems_claims, systems_report,
                                        systems_table, table_markdown)
from dpbr.spec import RunSpec

IDEAL = "ideal(compute=0.01)"
REP = "draco(code=repetition,r=3,tol=0,vote=exact)"
CYC = "draco(code=cyclic,r=3,tol=0,vote=exact)"
TOL = "draco(code=repetition,r=3,tol=150,vote=tolerance)"
STEPS = 4  # steps 1..4, evaluations at 0, 2, 4


def run(system: str = "server", gar: str = "average", attack: str = "none", *, network: str = IDEAL,
        staleness: int = 0, epsilon: float = math.nan, seed: int = 1, acc=(0.1, 0.5, 0.8),
        dist=(1.0, 2.0, 3.0, 4.0), grads=9.0, messages=18.0, bytes_workers=100.0, bytes_servers=50.0, rounds=2.0,
        step_s=0.01, **per_step) -> pd.DataFrame:
    """The metrics rows of one run: step 0 (evaluation only) and steps 1..4; scalars are the same every step,
    sequences give steps 1..4 (``acc``: the evaluations at steps 0, 2, 4)."""
    steps = np.arange(STEPS + 1)

    def column(value, first=math.nan):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * STEPS
        return [first, *values]

    group = f"{system}/{network}/{staleness}/{gar}/{attack}/{epsilon}"
    frame = pd.DataFrame({
        "group_id": group, "cell_id": f"{group}/seed={seed}", "seed": seed, "step": steps,
        "test_accuracy": [acc[0], math.nan, acc[1], math.nan, acc[2]],
        "param_distance": column(dist),
        "system": system, "network": network, "staleness": staleness, "gar": gar, "attack": attack,
        "epsilon": epsilon, "workers": 9, "byzantine_real": 0 if attack == "none" else 1,
        "dataset": "mnist", "model": "lenet", "batch_size": 32,
        "gradient_computations": column(grads), "messages": column(messages),
        "bytes_workers": column(bytes_workers), "bytes_servers": column(bytes_servers), "rounds": column(rounds),
        "step_seconds": column(step_s),
    })
    for name, value in per_step.items():
        frame[name] = column(value)
    return frame


def final_of(metrics: pd.DataFrame) -> pd.DataFrame:
    """``dpbr aggregate``'s final table, as plain pandas: the last evaluation of each run, over seeds."""
    ev = metrics.loc[metrics["test_accuracy"].notna()].sort_values(["cell_id", "step"])
    last = ev.groupby("cell_id").tail(1)
    g = last.groupby("group_id")
    return pd.DataFrame({
        "accuracy_mean": g["test_accuracy"].mean(), "accuracy_std": g["test_accuracy"].std(ddof=1),
        "completed": g["test_accuracy"].count(), "seeds": g["seed"].agg(lambda s: ",".join(map(str, sorted(s)))),
    }).reset_index()


def tables(*runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    metrics = pd.concat(runs, ignore_index=True)
    table = systems_table(metrics, final_of(metrics))
    return metrics, table, systems_claims(table, metrics).set_index("id")


def verdict(*runs: pd.DataFrame, claim: str) -> str:
    return tables(*runs)[2].loc[claim, "verdict"]


# ----------------------------------------------------------------------------------------------- #


def test_applies_to_grids_with_a_system_network_or_staleness():
    base = dict(dataset="synthetic(d=20,classes=2)", model="logit", workers=9, byzantine=1)
    plain = RunSpec.create(**base, attack="none")
    assert not applies([plain]) and not applies([])
    assert applies([plain, RunSpec.create(**base, network="ideal(compute=0.01)")])
    assert applies([RunSpec.create(**base, attack="sign-flip", system="draco(r=3)")])
    assert applies([RunSpec.create(**base, staleness=2)])


def test_system_labels():
    assert system_label(REP) == "DRACO repetition r=3"
    assert system_label(TOL) == "DRACO repetition r=3 tolerance vote tol=150"
    assert system_label("guanyu(m=6,byzantine=1,attack=negate)") == "GuanYu m=6 (1 Byzantine: negate)"
    assert system_label("liubei(m=4,byzantine=0)") == "LiuBei m=4 (no Byzantine server)"
    assert system_label("server") == "server" and system_label("unknown(x=1)") == "unknown(x=1)"


def test_table_means_over_steps_then_seeds():
    metrics, table, _ = tables(
        run(gar="median", attack="sign-flip", seed=1, acc=(0.1, 0.6, 0.80), step_s=0.01, seconds_aggregate=0.002),
        run(gar="median", attack="sign-flip", seed=2, acc=(0.1, 0.6, 0.90), step_s=[0.01, 0.02, 0.03, 0.04],
            messages=[18, 18, 20, 20], seconds_aggregate=0.004),
        run(REP, attack="sign-flip", grads=27.0, update_applied=[1, 0, 1, 1], decoded_fraction=[1, 0, 1, 0.5],
            located_byzantine=1.0, seconds_step=[0.1, 0.2, 0.3, 0.4], server_spread=[0.0, 0.5, 0.25, 0.0]),
    )
    assert list(table["setup"]) == ["server", "DRACO repetition r=3"]  # the one server first
    median, draco = table.iloc[0], table.iloc[1]
    assert median["accuracy_mean"] == pytest.approx(0.85)
    assert median["accuracy_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert median["accuracy"] == f"0.8500 ± {np.std([0.8, 0.9], ddof=1):.4f}" and median["seeds"] == "1,2"
    assert median["messages"] == pytest.approx((18 + 19) / 2)  # seed 1: 18, seed 2: (18+18+20+20)/4
    assert median["bytes"] == 150 and median["rounds"] == 2 and median["gradient_computations"] == 9
    assert median["step_seconds"] == pytest.approx((0.01 + 0.025) / 2)
    assert median["simulated_seconds"] == pytest.approx((0.04 + 0.10) / 2)
    assert median["updates_per_second"] == pytest.approx((4 / 0.04 + 4 / 0.10) / 2)  # every engine step applies
    assert median["seconds_aggregate"] == pytest.approx(0.003)
    assert math.isnan(median["decoded_fraction"]) and math.isnan(median["seconds_step"])
    assert draco["gradient_computations"] == 27 and draco["simulated_seconds"] == pytest.approx(0.04)
    assert draco["update_applied"] == pytest.approx(0.75) and draco["decoded_fraction"] == pytest.approx(0.625)
    assert draco["updates_per_second"] == pytest.approx(3 / 0.04)
    assert draco["seconds_step"] == pytest.approx(0.25) and draco["server_spread_max"] == 0.5
    assert draco["accuracy"] == "0.8000 (1 seed)"
    md = table_markdown(table)
    assert "| server | median | sign-flip | none | 0.8500 ± 0.0707 | 9 | 18.5 | 150 | 2 | 0.0175 | 0.07 | 70 |" in md
    assert "| DRACO repetition r=3 | average | sign-flip | none | 0.625 | 0.75 | 1 |" in md


# --- claim a: DRACO exact recovery -----------------------------------------------------------------


def test_draco_exact_recovery_holds_only_for_identical_runs():
    twin = run(REP)
    same = run(REP, attack="sign-flip")
    assert verdict(twin, same, claim="a") == HOLDS
    off = run(REP, attack="sign-flip", dist=(1.0, 2.0, 3.0, 4.0 + 1e-7))
    metrics, _, claims = tables(twin, off)
    assert claims.loc["a", "verdict"] == FAILS and "1e-07" in claims.loc["a", "evidence"]
    off_acc = run(REP, attack="nan", acc=(0.1, 0.5, 0.8001))
    assert verdict(twin, same, off_acc, claim="a") == FAILS  # the weakest of the groups
    assert verdict(same, claim="a") == MISSING  # no adversary-free twin
    assert "no adversary-free twin" in tables(same)[2].loc["a", "evidence"]


def test_draco_cyclic_recovery_allows_rounding():
    twin = run(CYC, dist=(1.0, 2.0, 3.0, 4.0))
    assert verdict(twin, run(CYC, attack="little", dist=(1.0, 2.0, 3.0, 4.0 + 4e-6)), claim="a") == HOLDS  # 1e-6
    assert verdict(twin, run(CYC, attack="little", dist=(1.0, 2.0, 3.0, 4.004)), claim="a") == FAILS  # 1e-3


# --- claim b: DRACO r× gradient computations -------------------------------------------------------


def test_draco_gradient_computations_ratio():
    server = run(gar="median")
    assert verdict(server, run(REP, grads=27.0), claim="b") == HOLDS
    _, _, claims = tables(server, run(REP, grads=18.0))
    assert claims.loc["b", "verdict"] == FAILS and "= 2×" in claims.loc["b", "evidence"]
    assert verdict(run(REP, grads=27.0), claim="b") == MISSING


# --- claim c: time to accuracy ---------------------------------------------------------------------


def race(draco_step_s: float, median_acc=(0.1, 0.5, 0.88)):
    """Target 0.9 × 0.9 = 0.81: DRACO reaches it at step 2, median and multi-krum at step 4 (10 ms steps)."""
    return (run(REP, attack="sign-flip", acc=(0.1, 0.85, 0.90), step_s=draco_step_s),
            run(gar="median", attack="sign-flip", acc=median_acc),
            run(gar="multi-krum", attack="sign-flip", acc=(0.1, 0.6, 0.86)),
            run(gar="average"))  # attack none: not a rival


def test_draco_time_to_accuracy_verdicts():
    _, _, claims = tables(*race(0.01))  # 0.02 s vs 0.04 s: 2×
    assert claims.loc["c", "verdict"] == HOLDS
    assert "target 0.81" in claims.loc["c", "evidence"] and "median 0.04 s (2×)" in claims.loc["c", "evidence"]
    _, _, claims = tables(*race(0.015))  # 0.03 s vs 0.04 s: 1.33×
    assert claims.loc["c", "verdict"] == CAVEAT and "(1.333×)" in claims.loc["c", "evidence"]
    assert verdict(*race(0.03), claim="c") == FAILS  # 0.06 s vs 0.04 s
    assert verdict(*race(0.03, median_acc=(0.1, 0.2, 0.3))[:2], claim="c") == HOLDS  # the median never gets there
    assert verdict(race(0.01)[0], run(gar="median", attack="little"), claim="c") == MISSING
    assert verdict(run(REP), run(gar="median"), claim="c") == MISSING  # no attack: not the claim


# --- claim d: the vote under privacy noise ---------------------------------------------------------


def test_draco_privacy_vote_verdicts():
    def noisy(decoded, system=REP):
        return run(system, attack="sign-flip", epsilon=0.5, decoded_fraction=decoded)

    assert verdict(noisy(0.0), claim="d") == HOLDS
    assert verdict(noisy([0.0, 0.0, 0.2, 0.0]), claim="d") == CAVEAT  # mean 0.05
    assert verdict(noisy(1.0), claim="d") == FAILS
    assert verdict(noisy(1.0, TOL), claim="d") == MISSING  # the tolerance vote is not the claim
    _, _, claims = tables(noisy(0.0), noisy(0.9, TOL), run(gar="median", attack="sign-flip", epsilon=0.5))
    evidence = claims.loc["d", "evidence"]
    assert claims.loc["d", "verdict"] == HOLDS and "tolerance vote tol=150" in evidence and "decoded 0.9" in evidence
    assert "server, median, attack sign-flip, ε=0.5: accuracy 0.8000 (1 seed)" in evidence


# --- claims e, f, g: Byzantine servers -------------------------------------------------------------

GUANYU = "guanyu(m=6,byzantine=1,attack=random)"
LIUBEI = "liubei(m=4,byzantine=1,attack=negate)"


def test_guanyu_accuracy_and_overhead():
    base = run(gar="multi-krum", attack="little", acc=(0.1, 0.5, 0.88))
    ok = run(GUANYU, gar="multi-krum", attack="little", acc=(0.1, 0.5, 0.86), messages=138.0, rounds=3.0,
             step_s=0.015)
    _, _, claims = tables(base, ok)
    assert claims.loc["e", "verdict"] == HOLDS and "(Δ −0.02)" in claims.loc["e", "evidence"]
    assert claims.loc["f", "verdict"] == HOLDS
    assert "138 messages (7.667×)" in claims.loc["f", "evidence"] and "3 rounds (1.5×)" in claims.loc["f", "evidence"]
    bad = run("guanyu(m=6,byzantine=1,attack=negate)", gar="multi-krum", attack="little", acc=(0.1, 0.5, 0.80),
              step_s=0.025)
    _, _, claims = tables(base, ok, bad)
    assert claims.loc["e", "verdict"] == FAILS and claims.loc["f", "verdict"] == CAVEAT  # 2.5× the step time
    slow = run(GUANYU, gar="multi-krum", attack="little", step_s=0.04)
    assert verdict(base, slow, claim="f") == FAILS
    assert verdict(ok, claim="e") == MISSING and verdict(ok, claim="f") == MISSING


def test_liubei_accuracy_and_overhead():
    """Rounds per step against 2 + 1/T + 0.25 (T = 10 by default: 2.35), GuanYu's 3 for the caveat."""
    base = run(gar="multi-krum", attack="little", acc=(0.1, 0.5, 0.88))
    lean = run(LIUBEI, gar="multi-krum", attack="little", acc=(0.1, 0.5, 0.86), rounds=2.3, step_s=0.012)
    assert verdict(base, lean, claim="g") == HOLDS
    retries = run(LIUBEI, gar="multi-krum", attack="little", acc=(0.1, 0.5, 0.86), rounds=2.5, step_s=0.015)
    guanyu = run(GUANYU, gar="multi-krum", attack="little", step_s=0.02, messages=138.0, rounds=3.0)
    _, _, claims = tables(base, retries, guanyu)
    assert claims.loc["g", "verdict"] == CAVEAT
    assert "vs GuanYu 0.1304× messages, 0.75× s per step" in claims.loc["g", "evidence"]
    chatty = run(LIUBEI, gar="multi-krum", attack="little", acc=(0.1, 0.5, 0.86), rounds=3.2)
    assert verdict(base, chatty, claim="g") == FAILS
    wrong = run(LIUBEI, gar="multi-krum", attack="little", acc=(0.1, 0.5, 0.78), rounds=2.0, step_s=0.01)
    assert verdict(base, wrong, claim="g") == FAILS
    assert verdict(lean, claim="g") == MISSING


# --- claims h, i, j: one server ---------------------------------------------------------------------

LOSSY = "lossy(compute=0.01,drop=0.1,fill=zeros)"


def test_lossy_networks_and_nan_attack():
    runs = [run(gar="multi-krum", acc=(0.1, 0.5, 0.88)), run(gar="median", acc=(0.1, 0.5, 0.88)),
            run(gar="average", acc=(0.1, 0.5, 0.88)),
            run(gar="multi-krum", network=LOSSY, acc=(0.1, 0.5, 0.87), packets_lost=0.1),
            run(gar="average", network=LOSSY, acc=(0.1, 0.5, 0.30))]
    _, _, claims = tables(*runs)
    assert claims.loc["h", "verdict"] == HOLDS  # averaging's loss is shown, not judged
    assert "average under lossy drop=0.1 fill=zeros: 0.3 vs 0.88 (Δ −0.58) (not robust: shown only)" in \
        claims.loc["h", "evidence"]
    assert verdict(*runs, run(gar="median", attack="nan", acc=(0.1, 0.5, 0.70)), claim="h") == FAILS
    assert verdict(*runs[3:], claim="h") == MISSING  # no lossless counterpart
    other_link = run(gar="multi-krum", network="ideal(compute=0.02)")
    assert verdict(other_link, runs[3], claim="h") == MISSING  # an ideal network of another link


def test_multikrum_overhead_over_averaging():
    def pair(mk_seconds):
        return (run(gar="average", seconds_aggregate=0.001), run(gar="multi-krum", seconds_aggregate=mk_seconds))

    _, _, claims = tables(*pair(0.002))  # (0.01 + 0.002) / (0.01 + 0.001) − 1 = 9.09 %
    assert claims.loc["i", "verdict"] == HOLDS
    assert "aggregation 2 ms vs 1 ms (2×), step overhead 9.091 %" in claims.loc["i", "evidence"]
    assert verdict(*pair(0.005), claim="i") == CAVEAT  # 36.4 %
    assert verdict(*pair(0.01), claim="i") == FAILS  # 81.8 %
    assert verdict(pair(0.002)[1], claim="i") == MISSING
    lossy = run(gar="multi-krum", network=LOSSY, seconds_step=0.01)  # system runs do not count
    assert verdict(pair(0.002)[0], lossy, claim="i") == MISSING


def test_staleness_verdicts():
    sync = run(gar="average", acc=(0.1, 0.5, 0.88))
    tau2 = run(gar="average", staleness=2, acc=(0.1, 0.5, 0.87))
    assert verdict(sync, tau2, claim="j") == HOLDS
    tau8 = run(gar="average", staleness=8, acc=(0.1, 0.3, 0.50))
    assert verdict(sync, tau2, tau8, claim="j") == CAVEAT  # holds at the smallest τ only
    bad2 = run(gar="average", staleness=2, acc=(0.1, 0.3, 0.80))
    assert verdict(sync, bad2, tau8, claim="j") == FAILS
    assert verdict(tau2, claim="j") == MISSING


def test_every_claim_is_not_measured_without_its_cells():
    _, _, claims = tables(run(gar="average"), run(gar="median", attack="sign-flip"))
    assert list(claims.index) == list("abcdefghij")
    assert set(claims["verdict"]) == {MISSING}
    md = claims_markdown(claims.reset_index())
    assert md.count("**not measured (cells missing)**") == 10
    assert "\\|Δ test accuracy\\|" in md  # pipes escaped inside cells


# --- the command -----------------------------------------------------------------------------------


@pytest.fixture
def summary(tmp_path):
    metrics = pd.concat([run(gar="median", attack="sign-flip", seconds_aggregate=0.002), run(REP),
                         run(REP, attack="sign-flip", decoded_fraction=1.0)], ignore_index=True)
    folder = tmp_path / "summary"
    write_parquet(metrics, folder / "metrics.parquet")
    write_parquet(final_of(metrics), folder / "final_accuracy.parquet")
    return folder


def test_report_writes_tables_and_every_figure(summary, tmp_path):
    out = tmp_path / "figures"
    written = systems_report(summary, out, formats=["svg", "html"])
    names = {p.name for p in written}
    assert names == {*SUMMARY_FILES.values(), *(f"{f}.{fmt}" for f in FIGURES for fmt in ("svg", "html"))}
    table = pd.read_csv(summary / SUMMARY_FILES["table_csv"])
    assert len(table) == 3 and set(table["gradient_computations"]) == {9}
    claims = pd.read_csv(summary / SUMMARY_FILES["claims_csv"])
    assert len(claims) == 10 and claims.set_index("id").loc["a", "verdict"] == HOLDS
    assert "| claim | paper | verdict | evidence | rule |" in (summary / SUMMARY_FILES["claims_md"]).read_text()
    for figure in FIGURES:
        assert "<svg" in (out / f"{figure}.svg").read_text()[:400], figure
    assert "No GuanYu or LiuBei cells" in (out / "servers.html").read_text()
    assert "No DRACO cells with privacy noise" in (out / "privacy_vote.html").read_text()
    assert "No DRACO cells" not in (out / "draco_exact.html").read_text()


def test_cli_systems_report_and_its_one_line_errors(summary, tmp_path, capsys):
    main(["systems-report", "--summary-dir", str(summary), "--out-dir", str(tmp_path / "s"), "--formats", "html",
          "--quiet"])
    assert len(list((tmp_path / "s").glob("*.html"))) == len(FIGURES)

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as info:
            main(["systems-report", *args])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dpbr: error: ") and "\n" not in err
        return err

    assert "--summary-dir: " in error("--summary-dir", str(tmp_path / "nothing"))
    metrics = pd.read_parquet(summary / "metrics.parquet").drop(columns=["step_seconds"])
    write_parquet(metrics, summary / "metrics.parquet")
    err = error("--summary-dir", str(summary), "--out-dir", str(tmp_path / "t"))
    assert "--summary-dir: " in err and "'step_seconds' is missing" in err
    assert not (tmp_path / "t").exists()
    assert "--formats" in error("--summary-dir", str(summary), "--formats", "pdf")
