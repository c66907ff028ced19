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
# The temporary server's database (every flow run's parameters: requests included) lives in the
# state folder, not in ~/.prefect shared by every state folder. Only the database moves:
# PREFECT_HOME keeps the user's profiles (an API URL set with `prefect config set` still counts).
# (tasks.state's rule for the state folder, spelled out: the package does not import its own modules)
# A value this rule set in a parent process (marked by ERASURE_PREFECT_DATABASE_DEFAULT) is
# derived again here: a child command with a state folder of its own uses its own database.
_database = os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
_inherited = _database and _database == os.environ.get("ERASURE_PREFECT_DATABASE_DEFAULT")
if _inherited or not (_database or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")):
    _state = os.path.realpath(os.environ.get("ERASURE_STATE_DIR") or ".erasure")
    _database = f"sqlite+aiosqlite:///{os.path.join(_state, 'prefect', 'prefect.db')}"
    os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = os.environ["ERASURE_PREFECT_DATABASE_DEFAULT"] = _database
