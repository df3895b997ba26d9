"""The temperature sweep confirms its choice: the baseline and the T chosen on validation run again
on fresh seeds, each on synthetic data of its own, and the sweep run's answer is that confirmation."""

from __future__ import annotations

import pytest
from sweep_helpers import runs

from sall.errors import ConfigError
from sweeps import runner as rn
from sweeps import temperature as tp
from tracking import schema as sc


def _args(*argv: str):
    return rn.build_parser("temperature", "", tp.add_args).parse_args(list(argv))


def test_confirm_seeds_default_and_bad_values():
    assert tp.confirm_seeds(_args()) == [1]  # the main job: one fresh seed after the grid's
    assert tp.confirm_seeds(_args("--seeds", "0,1")) == [2]
    assert tp.confirm_seeds(_args("--smoke")) == []  # a smoke run stays a minute
    assert tp.confirm_seeds(_args("--dataset", "odir")) == []  # hours on real data: opt in
    assert tp.confirm_seeds(_args("--confirm-seeds", "none")) == []
    assert tp.confirm_seeds(_args("--smoke", "--confirm-seeds", "3,4,3")) == [3, 4]
    parser = rn.build_parser("temperature", "", tp.add_args)
    assert not rn.grid_overridden(parser.parse_args(["--smoke", "--confirm-seeds", "1"]), parser)  # still trimmed
    assert rn.grid_overridden(parser.parse_args(["--smoke", "--temperatures", "2"]), parser)
    for argv, words in (
        (("--confirm-seeds", "0"), "--confirm-seeds '0' reuses seed 0 of the grid"),
        (("--confirm-seeds", "one"), "--confirm-seeds 'one' is invalid"),
        (("--confirm-seeds", "2", "--no-baseline"), "with --no-baseline"),
    ):
        with pytest.raises(ConfigError, match=words):
            tp.confirm_seeds(_args(*argv))


def test_dry_run_names_the_confirmation_and_its_cost(capsys):
    assert (
        rn.run_sweep(
            "temperature",
            "",
            tp.grid,
            tp.add_args,
            tp.smoke,
            ["--smoke", "--confirm-seeds", "1", "--dry-run"],
            tp.confirm,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "\n9 trials;" in out
        and "then: the baseline and each task's T chosen on validation, on seeds 1 x folds 0,1,2: 6 to 9 trials" in out
    )


def test_a_bad_confirm_seed_fails_before_anything_runs(tmp_path, capsys):
    argv = ["--smoke", "--confirm-seeds", "0", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert rn.run_sweep("temperature", "", tp.grid, tp.add_args, tp.smoke, argv, tp.confirm) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --confirm-seeds '0' reuses seed 0") and not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_smoke_sweep_with_confirmation_answers_from_the_fresh_seeds(confirmed_sweep):
    d, out = confirmed_sweep  # --folds 0,1 --temperatures 8 --confirm-seeds 1
    assert "[sweep] chosen on validation: T=8" in out.stderr and "confirm: " in out.stderr
    rs = runs(d, "sall-temperature")
    (parent,) = [r for r in rs if r.data.tags.get(sc.TAG_STAGE) == sc.STAGE_SWEEP]
    students = [r for r in rs if r.data.tags.get(sc.TAG_STAGE) == sc.STAGE_STUDENT]
    seeds = sorted(int(r.data.params["seed"]) for r in students)
    assert seeds.count(0) == 4 and seeds.count(1) == 4  # the grid, then baseline + chosen T on both folds
    assert all(r.data.tags[sc.TAG_PARENT] == parent.info.run_id for r in students)
    text, m = parent.data.tags[sc.TAG_NOTE], parent.data.metrics
    assert "confirmed on folds 0,1 × seed 1 (test split)" in text
    assert "rests on 2 independent replicates (each drew its own data)" in text
    assert m["best/dr/confirmed"] == 1 and m["best/dr/n_replicates"] == 2 and "best/dr/p_holm" in m
    assert m["best/dr/independent"] == 1
    # the confirming replicates drew their own images, so their teachers are their own too
    fresh = [r for r in students if r.data.params["seed"] == "1"]
    assert all(r.data.params.get("redraw") == "True" for r in fresh)
    assert not any("redraw" in r.data.params for r in students if r.data.params["seed"] == "0")
    teachers = [r for r in rs if r.data.tags.get(sc.TAG_STAGE) == sc.STAGE_TEACHER]
    assert len(teachers) == 2 * 2 + 2 * 2  # dr and amd on folds 0,1: the grid's, then each replicate's own
    assert parent.data.tags[sc.per_task(sc.TAG_VERDICT, "dr")] in ("established", "suggestive", "not distinguished")
