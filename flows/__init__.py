"""The DAGs: erase, takedown, restore, audit. Flows only compose tasks."""
