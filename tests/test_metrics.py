"""Metrics and plots against hand-computed values (sall.metrics, sall.plots)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from sall.metrics import (
    SCALAR_KEYS,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    scalar_metrics,
    soft_label_stats,
    to_jsonable,
)
from sall.plots import confusion_csv, plot_confusion, plot_reliability, reliability_csv

# Tiny example: 4 samples, 3 classes.
#   sample  probs                label  pred  max   correct  p_true
#   s0      [0.70, 0.20, 0.10]   0      0     0.70  yes      0.70
#   s1      [0.10, 0.60, 0.30]   1      1     0.60  yes      0.60
#   s2      [0.20, 0.35, 0.45]   1      2     0.45  no       0.35
#   s3      [0.25, 0.40, 0.35]   2      1     0.40  no       0.35
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.10, 0.60, 0.30],
        [0.20, 0.35, 0.45],
        [0.25, 0.40, 0.35],
    ]
)
LABELS = np.array([0, 1, 1, 2])


@pytest.fixture(scope="module")
def m():
    return classification_metrics(PROBS, LABELS, n_bins=2)


def test_acc_conf_err(m):
    assert m["n"] == 4
    # 2 of 4 correct.
    assert m["acc"] == pytest.approx(0.5)
    # conf: mean max over correct = (0.70 + 0.60) / 2 = 0.65
    assert m["conf"] == pytest.approx(0.65)
    # err: mean max over wrong = (0.45 + 0.40) / 2 = 0.425
    assert m["err"] == pytest.approx(0.425)


def test_ece_and_reliability(m):
    # 2 bins: (0, 0.5] holds s2, s3 (conf 0.45, 0.40; both wrong): acc 0, conf 0.425
    #         (0.5, 1] holds s0, s1 (conf 0.70, 0.60; both right): acc 1, conf 0.65
    # ECE = |0 - 0.425| * 2/4 + |1 - 0.65| * 2/4 = 0.2125 + 0.175 = 0.3875
    assert m["ece"] == pytest.approx(0.3875)
    r = m["reliability"]
    assert len(r) == 2
    assert (r[0]["lo"], r[0]["hi"], r[1]["lo"], r[1]["hi"]) == (0.0, 0.5, 0.5, 1.0)
    assert [b["count"] for b in r] == [2, 2]
    assert r[0]["acc"] == pytest.approx(0.0) and r[0]["conf"] == pytest.approx(0.425)
    assert r[1]["acc"] == pytest.approx(1.0) and r[1]["conf"] == pytest.approx(0.65)


def test_expected_calibration_error_is_the_metrics_ece(m):
    """One ECE formula: on the metrics' own bins, on bins read back from JSON, on bins pooled over
    folds (counts added, acc/conf count-weighted), and nan when there is no sample."""
    assert expected_calibration_error(m["reliability"]) == m["ece"]
    assert expected_calibration_error(to_jsonable(m)["reliability"]) == m["ece"]
    half = [dict(b, count=b["count"] // 2) for b in m["reliability"]]  # a fold with half the samples
    pooled = [dict(b, count=b["count"] + h["count"]) for b, h in zip(m["reliability"], half)]
    assert expected_calibration_error(pooled) == pytest.approx(0.3875)
    assert math.isnan(expected_calibration_error(reliability_bins([], [], n_bins=5)))


def test_reliability_default_bins_and_empty_bins():
    m15 = classification_metrics(PROBS, LABELS)
    r = m15["reliability"]
    assert len(r) == 15
    assert sum(b["count"] for b in r) == 4
    # 15 right-closed bins (b/15, (b+1)/15]:
    #   0.40 = 6/15 exactly -> right edge of bin 5;  0.45 * 15 = 6.75 -> bin 6;
    #   0.60 = 9/15 exactly -> right edge of bin 8;  0.70 * 15 = 10.5 -> bin 10.
    counts = {i: b["count"] for i, b in enumerate(r) if b["count"]}
    assert counts == {5: 1, 6: 1, 8: 1, 10: 1}
    for b in r:
        if b["count"] == 0:
            assert b["acc"] is None and b["conf"] is None
    # With one sample per bin, ECE = mean |correct - conf|
    #   = (|0-0.40| + |0-0.45| + |1-0.60| + |1-0.70|) / 4 = (0.40+0.45+0.40+0.30)/4 = 0.3875
    assert m15["ece"] == pytest.approx(0.3875)


def test_nll_and_brier(m):
    # nll = -(ln 0.70 + ln 0.60 + ln 0.35 + ln 0.35) / 4
    #     = (0.356675 + 0.510826 + 1.049822 + 1.049822) / 4 = 2.967145 / 4 = 0.741786
    assert m["nll"] == pytest.approx(0.741786, abs=1e-6)
    # brier per sample, sum_k (p_k - onehot_k)^2:
    #   s0: 0.3^2 + 0.2^2 + 0.1^2           = 0.09 + 0.04 + 0.01     = 0.14
    #   s1: 0.1^2 + 0.4^2 + 0.3^2           = 0.01 + 0.16 + 0.09     = 0.26
    #   s2: 0.2^2 + 0.65^2 + 0.45^2         = 0.04 + 0.4225 + 0.2025 = 0.665
    #   s3: 0.25^2 + 0.4^2 + 0.65^2         = 0.0625 + 0.16 + 0.4225 = 0.645
    #   mean = 1.71 / 4 = 0.4275
    assert m["brier"] == pytest.approx(0.4275)


def test_nll_clips_zero_probability():
    m0 = classification_metrics(np.array([[1.0, 0.0]]), np.array([1]))
    # -ln(1e-12) = 27.631021
    assert m0["nll"] == pytest.approx(-math.log(1e-12))
    assert math.isfinite(m0["nll"])


def test_confusion(m):
    # rows true, cols predicted: true 0 -> pred 0; true 1 -> pred 1 (s1), pred 2 (s2);
    # true 2 -> pred 1 (s3)
    assert m["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 1, 0]]
    assert all(type(v) is int for row in m["confusion"] for v in row)


def test_kappa_by_hand(m):
    # Quadratic weights w_ij = (i - j)^2 / (K - 1)^2 with K = 3:
    #   W = [[0, .25, 1], [.25, 0, .25], [1, .25, 0]]
    # Observed O = confusion = [[1,0,0],[0,1,1],[0,1,0]]: sum W*O = .25 (O[1,2]) + .25 (O[2,1]) = 0.5
    # Marginals: true [1, 2, 1], predicted [1, 2, 1]; expected E = outer(true, pred) / N
    #   E = [[.25, .5, .25], [.5, 1, .5], [.25, .5, .25]]
    #   sum W*E = (.25*.5 + 1*.25) + (.25*.5 + .25*.5) + (1*.25 + .25*.5) = .375 + .25 + .375 = 1.0
    # kappa = 1 - 0.5 / 1.0 = 0.5
    assert m["kappa"] == pytest.approx(0.5)


def test_kappa_second_case_by_hand():
    # K = 3, labels [0, 0, 1, 2], preds [0, 1, 1, 1] (one-hot-ish probs)
    #   O = [[1,1,0],[0,1,0],[0,1,0]]; sum W*O = .25 (O[0,1]) + .25 (O[2,1]) = 0.5
    #   true marginals [2,1,1], pred marginals [1,3,0]; E = outer / 4
    #   E = [[.5, 1.5, 0], [.25, .75, 0], [.25, .75, 0]]
    #   sum W*E = .25*1.5 + .25*.25 + 1*.25 + .25*.75 = .375 + .0625 + .25 + .1875 = 0.875
    #   kappa = 1 - 0.5/0.875 = 0.428571...
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.1, 0.5, 0.4]])
    labels = np.array([0, 0, 1, 2])
    mk = classification_metrics(probs, labels)
    assert mk["kappa"] == pytest.approx(1 - 0.5 / 0.875)
    assert mk["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_macro_f1(m):
    # class 0: tp 1, fp 0, fn 0 -> F1 = 1
    # class 1: tp 1 (s1), fp 1 (s3), fn 1 (s2) -> P = R = 0.5 -> F1 = 0.5
    # class 2: tp 0, fp 1 (s2), fn 1 (s3) -> F1 = 0
    # macro = (1 + 0.5 + 0) / 3 = 0.5
    assert m["macro_f1"] == pytest.approx(0.5)


def test_all_correct_err_is_nan_then_none():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([0, 1, 0])
    mc = classification_metrics(probs, labels, n_bins=5)
    assert mc["acc"] == 1.0
    # conf = (0.9 + 0.8 + 0.6) / 3 = 0.766667
    assert mc["conf"] == pytest.approx(2.3 / 3)
    assert math.isnan(mc["err"])
    # true [1,0,... ] vs pred identical -> kappa 1; every class F1 = 1
    assert mc["kappa"] == pytest.approx(1.0)
    assert mc["macro_f1"] == pytest.approx(1.0)
    j = to_jsonable(mc)
    assert j["err"] is None
    json.dumps(j, allow_nan=False)  # strict JSON works
    s = scalar_metrics(mc)
    assert math.isnan(s["err"])
    assert "err" not in scalar_metrics(mc, drop_nan=True)
    assert math.isnan(scalar_metrics(j)["err"])  # None -> nan


def test_all_wrong():
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    labels = np.array([1, 0])
    mw = classification_metrics(probs, labels, n_bins=2)
    assert mw["acc"] == 0.0
    assert math.isnan(mw["conf"])
    # err = (0.9 + 0.7) / 2 = 0.8
    assert mw["err"] == pytest.approx(0.8)
    # bin (0.5, 1]: both, acc 0, conf 0.8 -> ECE = 0.8
    assert mw["ece"] == pytest.approx(0.8)
    assert mw["confusion"] == [[0, 1], [1, 0]]
    assert mw["macro_f1"] == 0.0
    # K = 2: W = [[0,1],[1,0]]; O = [[0,1],[1,0]] -> sum W*O = 2;
    # marginals [1,1],[1,1]: E = [[.5,.5],[.5,.5]] -> sum W*E = 1; kappa = 1 - 2/1 = -1
    assert mw["kappa"] == pytest.approx(-1.0)
    assert to_jsonable(mw)["conf"] is None


def test_single_class_degenerate_kappa_is_zero():
    # All labels and all predictions are class 0 of K = 3: expected disagreement is 0,
    # sklearn's kappa is nan -> we return 0.0 without raising or warning.
    probs = np.array([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2]])
    labels = np.array([0, 0])
    ms = classification_metrics(probs, labels)
    assert ms["acc"] == 1.0
    assert ms["kappa"] == 0.0
    # macro over labels=range(3): class 0 F1 = 1, classes 1, 2 absent -> 0 -> 1/3
    assert ms["macro_f1"] == pytest.approx(1 / 3)
    assert ms["confusion"] == [[2, 0, 0], [0, 0, 0], [0, 0, 0]]
    json.dumps(to_jsonable(ms), allow_nan=False)


def test_single_column_probs():
    ms = classification_metrics(np.ones((3, 1)), np.zeros(3, dtype=int))
    assert ms["acc"] == 1.0 and ms["kappa"] == 0.0 and ms["confusion"] == [[3]]
    assert ms["nll"] == pytest.approx(0.0) and ms["brier"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "probs, labels",
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int)),
        (np.full((2, 3), 1 / 3), np.array([0, 3])),
        (np.full((2, 3), 1 / 3), np.array([0])),
        (np.full(3, 1 / 3), np.array([0])),
    ],
)
def test_invalid_inputs_raise(probs, labels):
    with pytest.raises(ValueError):
        classification_metrics(probs, labels)


def test_scalar_metrics_keys_and_types(m):
    s = scalar_metrics(m)
    assert tuple(s) == SCALAR_KEYS
    assert all(type(v) is float for v in s.values())


def test_to_jsonable():
    obj = {
        "a": np.float32(1.5),
        "b": np.array([[1, 2], [3, 4]], dtype=np.int64),
        "c": (np.nan, float("inf"), 2.0),
        np.int64(3): [np.bool_(True)],
    }
    j = to_jsonable(obj)
    assert j == {"a": 1.5, "b": [[1, 2], [3, 4]], "c": [None, None, 2.0], 3: [True]}
    json.dumps(j, allow_nan=False)
    assert type(j["b"][0][0]) is int


def test_whole_dict_is_strict_json(m):
    text = json.dumps(to_jsonable(m), allow_nan=False)
    assert json.loads(text)["confusion"] == m["confusion"]


def test_soft_label_stats_by_hand():
    # [0.75, 0.1, 0.1, 0.05]: mean 0.25, deviations .5, -.15, -.15, -.2
    #   var = (.25 + .0225 + .0225 + .04) / 4 = 0.335 / 4 = 0.08375 (paper T=1: 0.0960)
    # [0.25, 0.25, 0.25, 0.25]: var 0, max 0.25
    # -> max_mean = (0.75 + 0.25) / 2 = 0.5, var = 0.08375 / 2 = 0.041875
    st = soft_label_stats(np.array([[0.75, 0.1, 0.1, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    assert st["max_mean"] == pytest.approx(0.5)
    assert st["var"] == pytest.approx(0.041875)
    one = soft_label_stats(np.array([[0.75, 0.1, 0.1, 0.05]]))
    assert one["max_mean"] == pytest.approx(0.75)
    assert one["var"] == pytest.approx(0.08375)
    # one-hot of K = 2: [1, 0]: mean .5, var = (.25 + .25) / 2 = 0.25
    assert soft_label_stats(np.array([[1.0, 0.0]]))["var"] == pytest.approx(0.25)


def _png_ok(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n"


def test_plots_and_csvs(tmp_path, m):
    names = ["g0", "g1", "g2"]
    p = plot_confusion(m["confusion"], names, "DR test", str(tmp_path / "sub" / "cm.png"))
    assert p == str(tmp_path / "sub" / "cm.png") and _png_ok(p)
    p2 = plot_confusion(m["confusion"], names, "raw", str(tmp_path / "cm_raw.png"), normalize=False)
    assert _png_ok(p2)
    m15 = classification_metrics(PROBS, LABELS)
    p3 = plot_reliability(m15["reliability"], "DR reliability", str(tmp_path / "rel.png"))
    assert _png_ok(p3) and (tmp_path / "rel.png").stat().st_size > 1000
    # JSON round-tripped bins (None for empty bins) plot too.
    rel_json = json.loads(json.dumps(to_jsonable(m15["reliability"])))
    assert _png_ok(plot_reliability(rel_json, "t", str(tmp_path / "rel2.png")))

    c = confusion_csv(m["confusion"], names, str(tmp_path / "cm.csv"))
    with open(c, newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 4 and all(len(r) == 4 for r in rows)
    assert rows[0][1:] == names and rows[2] == ["g1", "0", "1", "1"]

    r = reliability_csv(m15["reliability"], str(tmp_path / "rel.csv"))
    with open(r, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15
    assert list(rows[0]) == ["lo", "hi", "count", "acc", "conf"]
    assert sum(int(x["count"]) for x in rows) == 4
    assert rows[0]["acc"] == ""  # empty bin


def test_plot_confusion_shape_mismatch(tmp_path):
    with pytest.raises(ValueError):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], "t", str(tmp_path / "x.png"))
