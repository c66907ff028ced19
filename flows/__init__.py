"""The DAGs: erase, takedown, restore, audit. Flows only compose tasks."""

import tasks  # noqa: F401  (Prefect's settings, before any flow imports prefect)
from tasks.state import StateDirError, private_prefect_database

# Prefect's temporary server keeps its database in the state folder (``tasks`` names it) and
# creates no folder for it: made here, private, before any flow can start that server. A state
# folder that cannot be used is left for the commands to report (``cli.pipeline``), not an
# import error.
try:
    private_prefect_database()
except StateDirError:
    pass
