"""Whether erasure worked: sampling probes on the base and erased models, judges, metrics, reports."""
