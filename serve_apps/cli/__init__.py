"""The `packserve` command and the two processes it starts (gateway only, or the whole Ray application)."""

from serve_apps.cli.commands import main

__all__ = ["main"]
