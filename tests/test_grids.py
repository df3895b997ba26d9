"""What the grid scripts put in their grids, and what the runner hands their trials (no Ray, no training)."""

from __future__ import annotations

from sall.config import from_preset
from sweeps import ablation
from sweeps.runner import build_parser


def ablation_grid(*argv: str) -> list[tuple[str, object]]:
    args = build_parser("ablation", ablation.__doc__, ablation.add_args).parse_args(list(argv))
    return ablation.grid(args, from_preset("cpu"))


def test_ablation_at_one_temperature_is_table_iii_with_the_real_baseline():
    grid = ablation_grid("--temperatures", "8")
    labels = [label for label, _ in grid]
    assert labels == ["baseline", "T=1 sa=no mt=yes", "T=8 sa=yes mt=no", "T=8 sa=yes mt=yes"]
    assert grid[0][1].is_baseline  # reuses the teachers instead of training them again at T=8


def test_rows_without_soft_labels_run_once_whatever_the_temperatures():
    grid = ablation_grid("--temperatures", "2,8,2")
    keys = [cfg.key() for _, cfg in grid]
    assert len(keys) == len(set(keys)) == 2 + 2 * 2
    assert all(cfg.temperature == 1.0 for _, cfg in grid if not cfg.sa_labels)


def test_the_driver_forwards_its_mlflow_client_settings_to_the_trials():
    from sweeps.runner import forwarded_env

    env = {"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "SALL_DEBUG_FAIL": "student"}
    env |= {"HOME": "/root", "AWS_SECRET_ACCESS_KEY": "s", "RAY_ADDRESS": "auto", "XMLFLOW_X": "no"}
    assert forwarded_env(env) == {
        k: env[k] for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "SALL_DEBUG_FAIL")
    }
    assert forwarded_env({"PATH": "/bin"}) == {}
