"""What the grid scripts put in their grids (no Ray, no training)."""

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
