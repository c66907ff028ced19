"""Compliance audits: the deployment's policy, held-out probes judged under it, and attacks."""
