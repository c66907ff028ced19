"""The ``erasure`` command line (one Typer app; see ``cli.main``)."""
