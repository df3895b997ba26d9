"""The MLflow layer both the sweeps and the analysis use: the schema (every tag, stage, metric name and
artifact path) and the client (retries, run creation and lookup, filter strings). It imports `sall` only,
never `analysis` or `sweeps` (docs/architecture.md)."""
