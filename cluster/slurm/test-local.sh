#!/usr/bin/env bash
# On-demand end-to-end test of cluster/slurm/sall.sbatch (too long for the 12-minute suite):
# a local Slurm (munged, slurmctld, two slurmd nodes on 127.0.0.1) and an MLflow server,
# `sbatch --nodes=2 --wait cluster/slurm/sall.sbatch` running a smoke temperature sweep on Ray
# inside the allocation; checks every trial FINISHED once and trials ran on both Ray nodes,
# then stops everything it started. Needs root and Slurm (cluster/install-services.sh).
#   cluster/slurm/test-local.sh [extra pytest flags]
# Python: $SALL_PYTHON if set, else the active venv, else ./.venv in the repository, else python3.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${SALL_PYTHON:-}"
if [[ -z "$py" ]]; then
  for cand in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$repo/.venv/bin/python"; do
    if [[ -n "$cand" && -x "$cand" ]]; then py="$cand"; break; fi
  done
fi
py="${py:-python3}"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Its own pytest folder, which other pytest runs on the machine do not rotate away: the jobs'
# output (job.out), the Slurm logs and the MLflow database stay there for a look afterwards.
base="${SALL_SLURM_TEST_DIR:-/tmp/sall-slurm-test}"
SALL_SLURM_SWEEP=1 exec "$py" -m pytest -q -s -p no:cacheprovider --basetemp "$base" tests/test_slurm.py "$@"
