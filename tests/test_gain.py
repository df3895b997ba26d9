"""The verdicts' statistics: worked examples, and their calibration over simulated sweeps.

The calibration runs simulated sweeps through `gain.family`, the code that gives every table row
its verdict, and checks on a few of them that the table itself (analysis/tables.py, from runs
grouped into settings) prints the same verdicts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from analysis import calibration as cb
from analysis import common as cm
from analysis import gain as gn
from analysis import tables as tb
from sall.config import from_preset


# ---------------------------------------------------------------------------------------------
# worked examples
def test_holm_and_bh_match_a_worked_example():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert gn.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: p_(i) * 4 / i = 0.02, 0.02, 0.04, 0.04, back in the input's order
    assert gn.bh(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # a NaN (a comparison without two folds) is not in the family: the others are adjusted over 3
    withnan = gn.holm(np.array([0.01, np.nan, 0.03, 0.005]))
    assert math.isnan(withnan[1]) and withnan[[0, 2, 3]] == pytest.approx([0.02, 0.03, 0.015])
    assert gn.bh(np.array([0.01, np.nan]))[0] == pytest.approx(0.01)
    # vectorised over sweeps: each row is its own family
    assert gn.holm(np.array([p, p[::-1]]))[1] == pytest.approx([0.02, 0.06, 0.06, 0.03])


def test_corrected_t_matches_the_formula_and_reduces_to_the_plain_t():
    d = np.array([0.02, 0.04, 0.09])
    c = gn.corrected_t(d, ratio=0.5)
    s = d.std(ddof=1)
    se = math.sqrt(1 / 3 + 0.5) * s
    assert float(c.se) == pytest.approx(se) and float(c.t) == pytest.approx(d.mean() / se)
    assert float(c.p) == pytest.approx(2 * sps.t.sf(d.mean() / se, 2))
    assert float(c.hi - c.mean) == pytest.approx(sps.t.ppf(0.975, 2) * se)
    plain = gn.corrected_t(d, ratio=0.0)
    assert float(plain.p) == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
    assert c.p > plain.p  # overlapping training sets: wider, never narrower
    # a missing fold leaves J = 2; one fold has no test
    two = gn.corrected_t(np.array([0.02, np.nan, 0.04]))
    assert int(two.n) == 2 and float(two.mean) == pytest.approx(0.03)
    assert math.isnan(float(gn.corrected_t(np.array([0.02, np.nan, np.nan])).p))


def test_the_fold_is_the_unit_odir_amd_at_t8():
    """The three-seed ODIR AMD result (docs/results-odir.md) at T = 8: 9 (fold, seed) pairs gave p = 0.003; the
    per-fold means over seeds are +2.5, +5.9, +5.5, and over them the plain t gives p = 0.05 and a
    CI of +0.0 to +9.3 pp. With the split's overlap corrected it is not even suggestive."""
    ours = {(f, s): 0.0 for f in range(3) for s in range(3)}
    ref = {(f, s): -m / 100 + (s - 1) * 0.01 for f, m in enumerate((2.5, 5.9, 5.5)) for s in range(3)}
    d = gn.fold_means(ours, ref)
    assert list(d) == [0, 1, 2] and [100 * v for v in d.values()] == pytest.approx([2.5, 5.9, 5.5])
    assert gn.seed_sd(ours, ref) == pytest.approx(0.01)
    plain = gn.corrected_t(np.array(list(d.values())), ratio=0.0)
    assert float(plain.p) == pytest.approx(0.05, abs=0.005)
    assert 100 * float(plain.lo) == pytest.approx(0.0, abs=0.15) and 100 * float(plain.hi) == pytest.approx(
        9.3, abs=0.1
    )
    fam = gn.family(np.array([list(d.values())]))
    assert fam.test.p[0] > 0.05 and fam.verdict[0] == gn.NOT_DISTINGUISHED


def test_verdict_words_follow_the_adjusted_p():
    p = np.array([0.001, 0.03, 0.2, np.nan])  # Holm over 3: 0.003, 0.06, 0.2
    ph = gn.holm(p)
    words = gn.verdict(p, ph)
    assert list(words) == [gn.ESTABLISHED, gn.SUGGESTIVE, gn.NOT_DISTINGUISHED, gn.NOT_DISTINGUISHED]
    assert all((w == gn.ESTABLISHED) == (h < 0.05) for w, h in zip(words, np.nan_to_num(ph, nan=1)))


def test_equivalence_needs_a_tight_interval_not_a_large_p():
    tight = gn.corrected_t(np.array([0.001, -0.002, 0.0, 0.002, -0.001]))
    wide = gn.corrected_t(np.array([0.04, -0.05, 0.01]))
    assert gn.tost(tight, 0.03) < 0.05  # within +-3 pp: a supported "no difference"
    assert wide.p > 0.05 and gn.tost(wide, 0.03) > 0.05  # not distinguished, and not shown equal either


def test_detectable_at_80_percent_power_exceeds_the_ci_half_width():
    half = sps.t.ppf(0.975, 2) * math.sqrt(1 / 3 + 0.5) * 0.02
    det = gn.detectable(0.02, 3)
    assert det == pytest.approx((sps.t.ppf(0.975, 2) + sps.t.ppf(0.8, 2)) * math.sqrt(1 / 3 + 0.5) * 0.02)
    assert det > 1.2 * half and math.isnan(gn.detectable(0.02, 1))


def test_choice_and_the_set_not_distinguished_from_it():
    close = {(f, 0): 0.80 + 0.01 * f for f in range(3)}
    cands = {
        "T=2": {k: v - 0.002 + 0.003 * (-1) ** k[0] for k, v in close.items()},
        "T=3": close,
        "T=50": {k: v - 0.20 + 0.001 * k[0] for k, v in close.items()},
    }
    assert gn.choose(cands) == "T=3"
    assert gn.near_best(cands, "T=3") == ["T=3", "T=2"]  # T=50's loss of 20 pp on every fold is established
    assert gn.choose({"T=1": {}}) is None


# ---------------------------------------------------------------------------------------------
# calibration: simulated sweeps, through the same code as the tables
def test_null_sweeps_claim_an_established_difference_in_at_most_5_percent():
    rng = np.random.default_rng(2024)
    for seeds in (1, 3):
        rate = cb.false_claim_rate(rng, 2000, seeds=seeds)
        assert rate <= 0.05, (seeds, rate)
    # the machinery can claim: a large effect is established in most sweeps
    assert cb.grid_power(rng, 1000, 0.4) > 0.5


def test_power_at_the_default_design_is_reported_and_rises_with_the_effect(capsys):
    rng = np.random.default_rng(7)
    grid3, conf3 = cb.grid_power(rng, 2000, 0.03), cb.confirmation_power(rng, 2000, 0.03)
    conf8 = cb.confirmation_power(rng, 2000, 0.08)
    print(f"power at 3 pp: grid table {grid3:.3f}, confirmation {conf3:.3f}; at 8 pp {conf8:.3f}")
    assert grid3 <= conf3 < conf8  # one pre-specified test keeps more power than 24 adjusted ones
    assert capsys.readouterr().out.startswith("power at 3 pp")


def _settings_of(acc: np.ndarray) -> list[cm.Setting]:
    """One simulated sweep (settings + 1, tasks, folds, seeds) as the analysis reads a store."""
    temps = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 50]
    runs = []
    for i in range(acc.shape[0]):
        for f in range(acc.shape[2]):
            for s in range(acc.shape[3]):
                base = from_preset("cpu", fold=f, seed=s)
                cfg = (
                    base.replace(temperature=1.0, multitask=False, sa_labels=False)
                    if i == 0
                    else base.replace(temperature=float(temps[i - 1]))
                )
                metrics = {f"test/{t}/acc": float(acc[i, j, f, s]) for j, t in enumerate(("dr", "amd"))}
                label = "baseline" if i == 0 else f"T={temps[i - 1]}"
                runs.append(
                    cm.TrialRun(f"{i}-{f}-{s}", "FINISHED", label, f, cfg.trial_key(), "", 0, cfg.params(), metrics)
                )
    return cm.settings(runs)


def test_the_table_prints_the_simulated_verdicts(tmp_path):
    rng = np.random.default_rng(5)
    acc = cb.simulate(rng, 4, cb.grid_effects(0.4), seeds=2)  # one setting far better
    fam = cb.established(acc)
    ps = gn.family(cb.fold_diffs(acc)).p_holm
    for k in range(acc.shape[0]):
        t = tb.build("IV", _settings_of(acc[k]), ["acc"])[0]
        tb.gains(t, None, Path(tmp_path), 0)
        assert [g["verdict"] == gn.ESTABLISHED for g in t.gains] == list(fam[k])
        assert [g["p_holm"] for g in t.gains] == pytest.approx(list(ps[k]))
    assert fam.any()  # the check compared some established verdicts, not only silence


# ---------------------------------------------------------------------------------------------
# replicates that drew their own data
def test_replicates_with_their_own_data_are_each_a_unit_tested_with_the_plain_t():
    ours = {(0, 1): 0.80, (1, 1): 0.78, (2, 1): 0.83, (0, 2): 0.81}
    ref = {(0, 1): 0.75, (1, 1): 0.77, (2, 1): 0.79, (0, 2): 0.80}
    fresh = gn.design_of(redraw=True, synthetic=True)
    d = gn.unit_diffs(ours, ref, fresh)
    assert d == pytest.approx({(0, 1): 0.05, (0, 2): 0.01, (1, 1): 0.01, (2, 1): 0.04})
    assert gn.unit_diffs(ours, ref) == pytest.approx({0: 0.03, 1: 0.01, 2: 0.04})  # one data set: per fold
    c = gn.corrected_t(np.array(list(d.values())), fresh.ratio)
    assert float(c.p) == pytest.approx(sps.ttest_1samp(list(d.values()), 0).pvalue)
    recut = gn.design_of(redraw=True, synthetic=False)  # repeated cross-validation: still corrected
    assert recut.per_replicate and recut.ratio == gn.SPLIT_RATIO and not recut.independent
    assert gn.design_of(redraw=False, synthetic=True) == gn.FOLDS
    assert fresh.units(3) == "3 independent replicates (each drew its own data)"


def test_null_confirmations_on_fresh_data_claim_at_most_5_percent_and_gain_power():
    """With each replicate its own data the plain t is exact, so its family-wise rate sits at 5 %
    by design; 4,000 simulated confirmations bound it within their sampling error (2.5 sd)."""
    rng = np.random.default_rng(11)
    n = 4000
    rate = cb.false_claim_rate(rng, n, ratio=0.0, settings=1)
    assert rate <= 0.05 + 2.5 * math.sqrt(0.05 * 0.95 / n), rate
    fresh, folds = cb.confirmation_power(rng, 2000, 0.03, ratio=0.0), cb.confirmation_power(rng, 2000, 0.03)
    assert fresh > folds  # independent replicates need no overlap correction: more power at one J
