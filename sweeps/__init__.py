"""Ray Tune sweeps of the paper's studies; each trial runs the whole SALL chain and logs to MLflow."""
