"""Adapters: the artifact store, content keys, Ray workers, the MLflow registry, Prefect tasks.

``tasks`` wraps ``erasure`` for the distributed pipeline; ``erasure`` never imports it.
"""
