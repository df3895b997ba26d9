#!/usr/bin/env bash
# Thin wrapper: run cluster/local.py with the project's Python.
#   cluster/local.sh up --workers 2 ; cluster/local.sh status ; cluster/local.sh down
# Python: $SALL_PYTHON if set, else the active venv ($VIRTUAL_ENV), else ./.venv or ./venv
# in the repository, else /work/venv, else python3 on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${SALL_PYTHON:-}"
if [[ -z "$py" ]]; then
  for cand in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$repo/.venv/bin/python" "$repo/venv/bin/python" /work/venv/bin/python; do
    if [[ -n "$cand" && -x "$cand" ]]; then py="$cand"; break; fi
  done
fi
py="${py:-python3}"
exec "$py" "$here/local.py" "$@"
