"""Entry point of the ``erasure`` command: the app with every command registered."""

from cli import library, pipeline  # noqa: F401  (importing registers their commands)
from cli.app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
