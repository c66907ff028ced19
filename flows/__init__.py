"""The DAGs: erase, takedown, restore, audit. Flows only compose tasks."""

import tasks  # noqa: F401  (Prefect's settings, before any flow imports prefect)
