"""CLI commands for this area; `register` adds them to the main group."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    pass
