"""Placeholder package: filled by the pipeline issue (Prefect tasks / flows)."""
