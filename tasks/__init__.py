"""Adapters: the artifact store, content keys, Ray workers, the MLflow registry, Prefect tasks.

``tasks`` wraps ``erasure`` for the distributed pipeline; ``erasure`` never imports it.
"""

import os

# Prefect reads its settings when it is imported, so they are set here, before any task or flow
# module imports it; an operator's own environment wins. Offline and in production Prefect must
# not phone home (its SDK and server analytics), and on a busy fresh machine the ephemeral
# server of the embedded default needs more than Prefect's 20 s to start (it timed out at 44 s).
PREFECT_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}
for _name, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
# Prefect's own database (every flow run's parameters: requests included) lives in the state
# folder, not in ~/.prefect shared by every state folder; the commands create it private
# (``tasks.state.private_prefect_home``) before a flow starts Prefect's temporary server.
# (tasks.state.state_dir's rule, spelled out: the package does not import its own modules)
os.environ.setdefault("PREFECT_HOME", os.path.join(os.path.realpath(os.environ.get("ERASURE_STATE_DIR") or ".erasure"), "prefect"))
