"""SALL: Synergic Adversarial Label Learning, as a plain library (no Ray, no MLflow)."""

from sall.errors import ConfigError, DataError, SallError
from sall.tasks import ALL_TASKS, TASKS

__all__ = ["ALL_TASKS", "TASKS", "ConfigError", "DataError", "SallError"]
