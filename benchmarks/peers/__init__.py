"""The alternatives to the farm, side by side: peers started by the harness.

``fastapi_naive.py``, ``litserve_batched.py`` and ``gthread_falcon.py`` are standalone
servers run with ``.venv-peers``'s python (they import ``peer_common`` as a top-level
module, never this package); ``harness.py`` starts and stops them from the farm's venv;
``scripts/compare_peers.py`` measures them against the farm.
"""

from benchmarks.peers.harness import (
    ENDPOINTS,
    PEERS,
    Peer,
    ensure_venv,
    session_cpu_seconds,
    start_peer,
    venv_ready,
)

__all__ = [
    "ENDPOINTS",
    "PEERS",
    "Peer",
    "ensure_venv",
    "session_cpu_seconds",
    "start_peer",
    "venv_ready",
]
