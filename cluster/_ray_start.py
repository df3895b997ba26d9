"""`ray start`, run in-process, for the loopback-only local cluster (cluster/local.py).

Usage: python cluster/_ray_start.py start [ray start flags...]

This is Ray's own `ray start` CLI (``ray.scripts.scripts.main``) with exactly one guard
lifted, and only when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set:

* With that variable set to 0 ("loopback mode"), Ray keeps ``127.0.0.1`` as the node IP
  instead of rewriting it to the machine's LAN address, and its gRPC servers (GCS, raylet,
  agents) then bind to 127.0.0.1 instead of all interfaces. That is what we want for a
  multi-node cluster that lives on one machine and must not listen on the network.
* But the same variable makes ``ray start --address ...`` (a worker node) abort with
  "Multi-node Ray clusters are not supported on Windows and OSX". That check is the only
  thing the variable gates in the CLI besides a hint message, so we hand the CLI a copy of
  ``ray_constants`` in which ``ENABLE_RAY_CLUSTER`` is true. The IP resolution in
  ``ray._private.services`` still reads the real module and stays in loopback mode.

Without the variable (a cluster bound to a non-loopback ``--host``), this is plain
``ray start``.
"""

from __future__ import annotations

import os
import sys
import types


def main() -> None:
    from ray.scripts import scripts

    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        real = scripts.ray_constants
        proxy = types.ModuleType(real.__name__)
        proxy.__dict__.update(vars(real))
        proxy.ENABLE_RAY_CLUSTER = True
        scripts.ray_constants = proxy
    sys.argv = ["ray", *sys.argv[1:]]
    scripts.main()


if __name__ == "__main__":
    main()
