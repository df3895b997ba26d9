"""Analysis of the sweeps: the paper's tables and figures from MLflow, external validation."""
