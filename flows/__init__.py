"""The DAGs: erase, takedown, restore, audit. Flows only compose tasks."""

import tasks  # noqa: F401  (Prefect's settings, before any flow imports prefect)
from tasks.state import private_prefect_home

# Prefect's temporary server keeps its database in PREFECT_HOME (the state folder's, set by
# ``tasks``) and creates only the last folder of it: the rest is made here, private, before any
# flow can start that server
private_prefect_home()
