#!/usr/bin/env bash
# Install the Debian packages that cluster/services.py and the cluster tests start for real:
# Ceph's RADOS Gateway (a real S3 server: radosgw, ceph-mon, ceph-osd), Slurm (slurmctld, slurmd,
# slurm-client, munge) and PostgreSQL (initdb, pg_ctl).
#
#   cluster/install-services.sh        # as root; prints one line
#
# Idempotent and quick when everything is present (one dpkg-query, no network), so .ci/run can
# call it before every test run. Only missing packages are installed, with one `apt-get update`.
# --no-install-recommends keeps Ceph at about 61 MB instead of pulling in its whole stack.
set -euo pipefail

PACKAGES=(radosgw ceph-mon ceph-osd slurmctld slurmd slurm-client munge)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
# PostgreSQL: any major version's server binaries will do (Debian 12 ships 15).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-services: all present (${PACKAGES[*]} postgresql)"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-services: error: missing ${missing[*]}; run cluster/install-services.sh as root" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install-services: error: missing ${missing[*]} and no apt-get (a Debian/Ubuntu machine is expected)" >&2
    exit 1
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    echo "install-services: error: apt-get failed installing ${missing[*]}: $(grep -E '^(E|W):' "$log" | tail -1)" >&2
    exit 1
fi
echo "install-services: installed ${missing[*]}"
