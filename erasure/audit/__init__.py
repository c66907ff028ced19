"""Compliance audits: the deployment's policy, held-out probes judged under it, and attacks; and
adversarial closure, which turns the attacks on an erasure's own training split before any audit."""
